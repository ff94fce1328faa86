"""Manual promotion and rollback of a registry alias, with the same Dice check as registration."""

from __future__ import annotations

import logging

from unet.registry import HISTORY_TAG, decide_promotion, move_alias, version_scores

log = logging.getLogger(__name__)

def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _holder(client, name: str, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def promote(
    name: str, alias: str, version: str, force: bool = False, min_improvement: float = 0.0, max_region_drop: float = 1.0
) -> str:
    """Move `alias` to `version` if its mean Dice beats the current holder (or `force`); returns a summary line."""
    client = _client()
    candidate = client.get_model_version(name, str(version))
    holder = _holder(client, name, alias)
    if holder is not None and str(holder.version) == str(version):
        return f"{alias} already points at {name} version {version}; nothing to do"
    if not force:
        new = version_scores(candidate.tags)
        if new is None:
            raise ValueError(f"{name} version {version} has no metric.mean_dice tag; evaluate it first or pass --force")
        current = version_scores(holder.tags) if holder is not None else None
        promote_it, reason = decide_promotion(new, current, min_improvement, max_region_drop)
        if not promote_it:
            raise ValueError(f"not promoting {name} version {version}: {reason}; pass --force to override")
    else:
        reason = "forced"
    move_alias(client, name, alias, str(version), str(holder.version) if holder else None)
    client.set_model_version_tag(name, str(version), f"promotion.{alias}", "promoted by hand")
    client.set_model_version_tag(name, str(version), f"promotion.{alias}.reason", reason)
    return f"{alias} -> {name} version {version} ({reason})"


def rollback(name: str, alias: str) -> str:
    """Move `alias` back to the version it pointed at before its last move; returns a summary line."""
    client = _client()
    tag = HISTORY_TAG.format(alias=alias)
    entries = [e for e in client.get_registered_model(name).tags.get(tag, "").split(",") if e]
    holder = _holder(client, name, alias)
    if holder is not None and (not entries or entries[-1] != str(holder.version)):
        entries.append(str(holder.version))
    if len(entries) < 2:
        raise ValueError(f"{name} has no earlier version under alias {alias} to roll back to")
    entries.pop()
    previous = entries[-1]
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(name, tag, ",".join(entries))
    client.set_model_version_tag(name, previous, f"promotion.{alias}", "restored by rollback")
    client.set_model_version_tag(name, previous, f"promotion.{alias}.reason",
                                 f"rollback from version {holder.version if holder else 'none'}")
    return f"{alias} rolled back to {name} version {previous}"
