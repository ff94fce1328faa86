"""Prefect flows and deployments that orchestrate the unet pipeline; all computing stays in `unet`.

Importing the package switches telemetry off for this process and everything it starts,
including Prefect's local server when no PREFECT_API_URL is set. Values already set win.
"""

import os

for _key, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "true"),
                     ("DVC_NO_ANALYTICS", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
    os.environ.setdefault(_key, _value)
