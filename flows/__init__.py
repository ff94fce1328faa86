"""Prefect flows that orchestrate the unet pipeline stages."""
