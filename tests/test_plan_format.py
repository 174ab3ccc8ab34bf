"""The .plan format: exact round trip, determinism, and refusal of every malformed file with one PlanError line."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save

from runtime import ModelFingerprint, Plan, PlanError, load_plan, save_plan
from runtime.plan import _canonical, _checksum, plan_from_bytes, plan_to_bytes

FP = ModelFingerprint("WanTransformer3DModel", "ab" * 32, ("blocks.0", "blocks.1", "blocks.2", "blocks.3"))


def make_plan(**changes) -> Plan:
    actions = np.zeros((4, 6), np.uint8)
    actions[1:3, 2:4] = 1
    actions[3, 4] = 2
    fields = dict(
        model=FP, timesteps=np.linspace(999, 1, 6), sigmas=np.linspace(1, 0.01, 6), actions=actions,
        labels=("foreground", "background", "background", "unlabelled"),
        label_scores=np.array([0.9, 0.1, 0.2, 0.0], np.float32), spans=((1, 3),),
        policy={"kind": "static", "warmup": 2}, provenance={"profile_sha256": "00", "planner": "test"},
        predicted={"speedup": 1.3, "error": 0.01}, arrays={"pca/blocks.3": np.eye(4, 2, dtype=np.float32)},
    )
    fields.update(changes)
    return Plan(**fields)


def write_raw(path, meta: dict, tensors: dict, checksum: bool = True) -> None:
    """Write a container by hand (bypassing Plan validation) with a correct checksum unless told otherwise."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    digest = _checksum(text, tensors) if checksum else "0" * 64
    path.write_bytes(save(tensors, metadata={"dit_plan": text, "content_sha256": digest}))


def raw_parts(plan: Plan) -> tuple[dict, dict]:
    text, tensors = _canonical(plan)
    return json.loads(text), dict(tensors)


def test_round_trip_is_exact(tmp_path):
    plan = make_plan()
    loaded = load_plan(save_plan(plan, tmp_path / "m.plan"))
    assert loaded == plan
    assert loaded.spans == ((1, 3),) and loaded.labels == plan.labels
    np.testing.assert_array_equal(loaded.actions, plan.actions)
    np.testing.assert_array_equal(loaded.sigmas, plan.sigmas)
    np.testing.assert_array_equal(loaded.arrays["pca/blocks.3"], plan.arrays["pca/blocks.3"])
    assert loaded.policy == plan.policy and loaded.predicted == plan.predicted


def test_same_plan_gives_same_bytes():
    assert plan_to_bytes(make_plan()) == plan_to_bytes(make_plan())
    assert plan_to_bytes(make_plan()) != plan_to_bytes(make_plan(predicted={"speedup": 1.31}))


def test_save_leaves_no_temporary_files(tmp_path):
    save_plan(make_plan(), tmp_path / "m.plan")
    assert [p.name for p in tmp_path.iterdir()] == ["m.plan"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema_version": 7}, "schema version 7"),
        ({"actions": np.zeros((4, 5), np.uint8)}, "field 'actions' has shape"),
        ({"actions": np.full((4, 6), 3, np.uint8)}, "unknown action code"),
        ({"timesteps": np.array([1.0, np.nan, 3, 4, 5, 6])}, "'timesteps' holds non-finite"),
        ({"label_scores": np.array([0, np.inf, 0, 0], np.float32)}, "'label_scores' holds non-finite"),
        ({"labels": ("foreground",)}, "field 'labels'"),
        ({"spans": ((2, 9),)}, "outside the 4 blocks"),
        ({"spans": ((0, 2),)}, "reuse steps differ"),
        ({"predicted": {"speedup": float("nan")}}, "'predicted' holds non-finite"),
        ({"arrays": {"w": np.array([np.nan], np.float32)}}, "extra array 'w' holds non-finite"),
        ({"actions": np.ones((4, 6), np.uint8)}, "reused at step 0 before it is ever computed"),
        ({"policy": {"mode": 1}}, "field 'policy'"),
    ],
)
def test_invalid_plans_are_refused(changes, message):
    with pytest.raises(PlanError, match=message):
        make_plan(**changes)


def test_unknown_schema_version_in_file(tmp_path):
    meta, tensors = raw_parts(make_plan())
    meta["schema_version"] = 99
    write_raw(tmp_path / "v.plan", meta, tensors)
    with pytest.raises(PlanError, match="unsupported plan schema version 99"):
        load_plan(tmp_path / "v.plan")


@pytest.mark.parametrize("field", ["model", "policy", "spans", "labels", "provenance", "predicted"])
def test_missing_metadata_field(tmp_path, field):
    meta, tensors = raw_parts(make_plan())
    del meta[field]
    write_raw(tmp_path / "m.plan", meta, tensors)
    with pytest.raises(PlanError, match=f"missing field '{field}'"):
        load_plan(tmp_path / "m.plan")


def test_missing_tensor_and_wrong_shape(tmp_path):
    meta, tensors = raw_parts(make_plan())
    write_raw(tmp_path / "a.plan", meta, {k: v for k, v in tensors.items() if k != "actions"})
    with pytest.raises(PlanError, match="missing tensor 'actions'"):
        load_plan(tmp_path / "a.plan")
    tensors["actions"] = np.zeros((3, 6), np.uint8)
    write_raw(tmp_path / "b.plan", meta, tensors)
    with pytest.raises(PlanError, match="field 'actions' has shape"):
        load_plan(tmp_path / "b.plan")


def test_wrong_dtype_and_undeclared_tensor(tmp_path):
    meta, tensors = raw_parts(make_plan())
    write_raw(tmp_path / "d.plan", meta, {**tensors, "actions": tensors["actions"].astype(np.float32)})
    with pytest.raises(PlanError, match="wrong dtype"):
        load_plan(tmp_path / "d.plan")
    write_raw(tmp_path / "e.plan", meta, {**tensors, "smuggled": np.zeros(3, np.float32)})
    with pytest.raises(PlanError, match="does not declare"):
        load_plan(tmp_path / "e.plan")


def test_non_finite_numbers_in_file(tmp_path):
    meta, tensors = raw_parts(make_plan())
    tensors["timesteps"] = tensors["timesteps"].copy()
    tensors["timesteps"][2] = np.inf
    write_raw(tmp_path / "n.plan", meta, tensors)
    with pytest.raises(PlanError, match="non-finite"):
        load_plan(tmp_path / "n.plan")


def test_pickle_zip_truncated_and_tampered_files(tmp_path):
    (tmp_path / "p.plan").write_bytes(pickle.dumps({"actions": [1, 2, 3]}))
    with zipfile.ZipFile(tmp_path / "z.plan", "w") as z:
        z.writestr("data.pkl", b"x")
    data = plan_to_bytes(make_plan())
    (tmp_path / "t.plan").write_bytes(data[: len(data) // 2])
    tampered = bytearray(data)
    tampered[-5] ^= 0x40
    (tmp_path / "x.plan").write_bytes(bytes(tampered))
    for name, message in [("p", "not a dit-plan file"), ("z", "not a dit-plan file"), ("t", "not a dit-plan file"), ("x", "checksum")]:
        with pytest.raises(PlanError, match=message) as info:
            load_plan(tmp_path / f"{name}.plan")
        assert "\n" not in str(info.value)


def test_safetensors_without_plan_metadata(tmp_path):
    (tmp_path / "w.plan").write_bytes(save({"weight": np.zeros(3, np.float32)}))
    with pytest.raises(PlanError, match="no 'dit_plan' metadata"):
        load_plan(tmp_path / "w.plan")


def test_missing_file():
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan("/nonexistent/dir/m.plan")


def test_bytes_api_matches_file_api(tmp_path):
    plan = make_plan()
    assert plan_from_bytes(plan_to_bytes(plan)) == plan
