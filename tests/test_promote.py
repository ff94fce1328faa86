"""Manual promotion and rollback against a real MLflow registry on SQLite."""

import pytest

from unet.promote import promote, rollback
from unet.registry import decide_promotion

NAME = "brain-tumor-unet"


@pytest.fixture()
def client(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model(NAME)
    (tmp_path / "model").mkdir()
    for dice in ("0.50", "0.70", "0.60"):
        version = client.create_model_version(NAME, source=(tmp_path / "model").as_uri())
        client.set_model_version_tag(NAME, version.version, "metric.mean_dice", dice)
    return client


def test_promote_better_version(client):
    client.set_registered_model_alias(NAME, "staging", "1")
    message = promote(NAME, "staging", "2")
    assert str(client.get_model_version_by_alias(NAME, "staging").version) == "2"
    assert "beats 0.5000" in message


def test_promote_worse_version_rejected(client):
    client.set_registered_model_alias(NAME, "staging", "2")
    with pytest.raises(ValueError, match="does not beat 0.7000.*--force"):
        promote(NAME, "staging", "3")
    assert str(client.get_model_version_by_alias(NAME, "staging").version) == "2"


def test_promote_force_overrides_gate(client):
    client.set_registered_model_alias(NAME, "staging", "2")
    promote(NAME, "staging", "3", force=True)
    assert str(client.get_model_version_by_alias(NAME, "staging").version) == "3"
    assert client.get_model_version(NAME, "3").tags["promotion.staging.reason"] == "forced"


def test_rollback_returns_previous_version(client):
    promote(NAME, "staging", "1")
    promote(NAME, "staging", "2")
    message = rollback(NAME, "staging")
    assert str(client.get_model_version_by_alias(NAME, "staging").version) == "1"
    assert message == f"staging rolled back to {NAME} version 1"


def test_rollback_without_history_fails(client):
    promote(NAME, "staging", "1")
    with pytest.raises(ValueError, match="no earlier version under alias staging"):
        rollback(NAME, "staging")


@pytest.mark.parametrize("new,current,margin,expected", [
    (0.70, None, 0.0, True),
    (0.70, 0.60, 0.0, True),
    (0.70, 0.70, 0.0, False),
    (0.70, 0.65, 0.1, False),
])
def test_decide_promotion(new, current, margin, expected):
    promote_it, _ = decide_promotion({"mean_dice": new}, None if current is None else {"mean_dice": current}, margin)
    assert promote_it is expected


def test_decide_promotion_rejects_region_drop():
    new = {"mean_dice": 0.80, "WT": 0.95, "TC": 0.85, "ET": 0.60}
    current = {"mean_dice": 0.75, "WT": 0.90, "TC": 0.65, "ET": 0.70}
    promote_it, reason = decide_promotion(new, current, 0.0, max_region_drop=0.05)
    assert promote_it is False
    assert "ET Dice drops by 0.1000 (0.7000 -> 0.6000)" in reason


def test_decide_promotion_allows_small_region_drop():
    new = {"mean_dice": 0.80, "WT": 0.95, "TC": 0.80, "ET": 0.66}
    current = {"mean_dice": 0.75, "WT": 0.90, "TC": 0.65, "ET": 0.70}
    promote_it, _ = decide_promotion(new, current, 0.0, max_region_drop=0.05)
    assert promote_it is True


def test_promote_checks_region_drop(client):
    for version, et in (("1", "0.80"), ("2", "0.40")):
        client.set_model_version_tag(NAME, version, "metric.dice_ET", et)
    client.set_registered_model_alias(NAME, "staging", "1")
    with pytest.raises(ValueError, match="ET Dice drops by 0.4000"):
        promote(NAME, "staging", "2", max_region_drop=0.05)


def test_rollback_after_registration_moved_alias(client):
    # The register stage moves the alias through the same history as unet promote.
    from unet.registry import move_alias

    move_alias(client, NAME, "staging", "1", None)
    move_alias(client, NAME, "staging", "2", "1")
    rollback(NAME, "staging")
    assert str(client.get_model_version_by_alias(NAME, "staging").version) == "1"


def test_promote_current_holder_is_noop(client):
    promote(NAME, "staging", "2")
    message = promote(NAME, "staging", "2")
    assert message == f"staging already points at {NAME} version 2; nothing to do"
    assert client.get_registered_model(NAME).tags["alias_history.staging"] == "2"
