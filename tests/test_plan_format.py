"""The .plan format: exact round trip, determinism, and refusal of every malformed file with one PlanError line."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save

from dit_accel.runtime import ModelFingerprint, Plan, PlanError, load_plan, save_plan
from dit_accel.runtime.plan import _canonical, _checksum, _signature, plan_from_bytes, plan_to_bytes, read_key_file

FP = ModelFingerprint("WanTransformer3DModel", "ab" * 32, ("blocks.0", "blocks.1", "blocks.2", "blocks.3"))


def make_plan(**changes) -> Plan:
    actions = np.zeros((4, 6), np.uint8)
    actions[1:3, 2:4] = 1
    actions[3, 4] = 2
    fields = dict(
        model=FP,
        timesteps=np.linspace(999, 1, 6),
        sigmas=np.linspace(1, 0.01, 6),
        actions=actions,
        labels=("foreground", "background", "background", "unlabelled"),
        label_scores=np.array([0.9, 0.1, 0.2, 0.0], np.float32),
        spans=((1, 3),),
        policy={"kind": "static", "warmup": 2},
        provenance={"profile_sha256": "00", "planner": "test"},
        predicted={"speedup": 1.3, "error": 0.01},
        arrays={"pca/blocks.3": np.eye(4, 2, dtype=np.float32)},
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
    for name, message in [
        ("p", "not a dit-plan file"),
        ("z", "not a dit-plan file"),
        ("t", "not a dit-plan file"),
        ("x", "checksum"),
    ]:
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


# --- bounds, typed policy parameters, derived claims, signatures --------------------------------------------------

KEY = b"format-test-signing-key-0123456789"
ADACACHE = {
    "kind": "adacache",
    "probe_block": 1,
    "codebook": [[0.05, 3], [1e9, 0]],
    "moreg": {"enabled": True, "norm": 0.3, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.1, 0.9]},
    "protect_first": 1,
    "protect_last": 1,
}
BWCACHE = {
    "kind": "bwcache",
    "threshold": 0.3,
    "reuse_steps": 2,
    "indicator_blocks": [0, 2],
    "protect_first": 1,
    "protect_last": 1,
    "refresh_every": 4,
}


def costed_plan(**changes) -> Plan:
    """`make_plan` with the planner's cost arrays and the predictions they imply."""
    arrays = {
        "cost.block_flops": np.array([100.0, 80, 80, 60]),
        "cost.pruned_flops": np.array([50.0, 40, 40, 30]),
        "cost.other_flops": np.array([20.0]),
    }
    plan = make_plan(arrays=arrays, **changes)
    computed, pruned = (plan.actions != 1), (plan.actions == 2)
    full_flops, pruned_flops = arrays["cost.block_flops"][:, None], arrays["cost.pruned_flops"][:, None]
    cost = (full_flops * (computed & ~pruned) + pruned_flops * pruned).sum() + 20.0 * 6
    full = (arrays["cost.block_flops"].sum() + 20.0) * 6
    predicted = {"speedup": float(full / cost), "compute_fraction": plan.compute_fraction(), "error": 0.01}
    return plan.with_changes(predicted=predicted)


def rewritten(plan: Plan, edit_meta=None, edit_tensors=None, key: bytes | None = None) -> bytes:
    """The plan's file after an edit of its metadata or tensors, with the checksum recomputed (as a forger would)."""
    meta, tensors = raw_parts(plan)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    metadata = {"dit_plan": text, "content_sha256": _checksum(text, tensors)}
    if key is not None:
        metadata["content_hmac_sha256"] = _signature(metadata["content_sha256"], key)
    return save(tensors, metadata=metadata)


def test_consistent_claims_load_and_edited_schedules_are_refused():
    plan = costed_plan()
    assert plan_from_bytes(plan_to_bytes(plan)) == plan

    def more_reuse(tensors):
        tensors["actions"] = tensors["actions"].copy()
        tensors["actions"][1:3, 1:5] = 1

    with pytest.raises(PlanError, match="claims compute fraction .* refit"):
        plan_from_bytes(rewritten(plan, edit_tensors=more_reuse))

    def cheaper_compute_claim(meta):
        meta["predicted"]["compute_fraction"] = 0.5
        meta["predicted"]["speedup"] *= 1.5

    with pytest.raises(PlanError, match="claims compute fraction"):
        plan_from_bytes(rewritten(plan, edit_meta=cheaper_compute_claim))
    faster = plan.predicted["speedup"] * 1.01
    with pytest.raises(PlanError, match="claims speedup 1.*refit"):
        plan_from_bytes(rewritten(plan, edit_meta=lambda m: m["predicted"].update(speedup=faster)))


def test_save_refuses_a_plan_whose_claims_no_longer_hold(tmp_path):
    stale = costed_plan().with_changes(actions=np.zeros((4, 6), np.uint8))
    with pytest.raises(PlanError, match="claims"):
        save_plan(stale, tmp_path / "stale.plan")
    assert not (tmp_path / "stale.plan").exists()


def test_adaptive_claims_are_checked_against_the_stored_simulation():
    expected = np.full((4, 6), 0.5, np.float32)
    plan = make_plan(
        actions=np.zeros((4, 6), np.uint8),
        spans=((0, 4),),
        policy=BWCACHE,
        arrays={"expected_compute": expected},
        predicted={"compute_fraction": 0.5, "speedup": 1.8},
    )
    assert plan_from_bytes(plan_to_bytes(plan)) == plan
    with pytest.raises(PlanError, match="claims compute fraction"):
        plan_from_bytes(rewritten(plan, edit_meta=lambda m: m["predicted"].update(compute_fraction=0.9)))


@pytest.mark.parametrize(
    "policy, message",
    [
        ({**ADACACHE, "probe_block": 1.0}, "probe_block"),
        ({**ADACACHE, "probe_block": "1"}, "probe_block"),
        ({**ADACACHE, "probe_block": 4}, "probe_block"),
        ({**ADACACHE, "codebook": [["a", 1]]}, "codebook"),
        ({**ADACACHE, "codebook": [[0.1]]}, "codebook"),
        ({**ADACACHE, "codebook": [[0.1, 1.5]]}, "codebook"),
        ({**ADACACHE, "codebook": [[-0.1, 1]]}, "codebook"),
        ({**ADACACHE, "codebook": []}, "codebook"),
        ({**ADACACHE, "moreg": {k: v for k, v in ADACACHE["moreg"].items() if k != "norm"}}, "moreg.norm"),
        ({**ADACACHE, "moreg": {**ADACACHE["moreg"], "norm": 0}}, "moreg.norm"),
        ({**ADACACHE, "moreg": {**ADACACHE["moreg"], "exponent": -1}}, "moreg.exponent"),
        ({**ADACACHE, "moreg": {**ADACACHE["moreg"], "norm": 1e-300}}, "overflows"),
        ({**ADACACHE, "moreg": {**ADACACHE["moreg"], "active": "ab"}}, "moreg.active"),
        ({**ADACACHE, "moreg": {**ADACACHE["moreg"], "enabled": "yes"}}, "moreg.enabled"),
        ({**ADACACHE, "moreg": [1]}, "moreg"),
        ({**ADACACHE, "protect_first": -1}, "protect_first"),
        ({k: v for k, v in ADACACHE.items() if k != "protect_last"}, "protect_last"),
        ({**BWCACHE, "refresh_every": 0}, "refresh_every"),
        ({**BWCACHE, "refresh_every": "4"}, "refresh_every"),
        ({**BWCACHE, "reuse_steps": -2}, "reuse_steps"),
        ({**BWCACHE, "threshold": "0.3"}, "threshold"),
        ({**BWCACHE, "indicator_blocks": [7]}, "indicator_blocks"),
        ({**BWCACHE, "indicator_blocks": []}, "indicator_blocks"),
        ({**BWCACHE, "indicator_blocks": [True]}, "indicator_blocks"),
        ({"kind": "static", "reuse": "quadratic"}, "reuse"),
    ],
)
def test_policy_parameters_are_type_checked(policy, message):
    with pytest.raises(PlanError, match=message):
        make_plan(actions=np.zeros((4, 6), np.uint8), spans=(), policy=policy)


def test_moreg_fields_the_runtime_defaults_may_be_omitted():
    for moreg in ({"enabled": False}, {k: v for k, v in ADACACHE["moreg"].items() if k != "active"}):
        plan = make_plan(actions=np.zeros((4, 6), np.uint8), spans=(), policy={**ADACACHE, "moreg": moreg})
        assert plan_from_bytes(plan_to_bytes(plan)) == plan


def test_unknown_policy_kinds_load_for_inspection():
    plan = make_plan(policy={"kind": "teacache", "rel_l1_threshold": 0.1})
    assert plan_from_bytes(plan_to_bytes(plan)).policy["kind"] == "teacache"


def test_validated_fields_are_read_only():
    import copy
    import pickle

    plan = make_plan(actions=np.zeros((4, 6), np.uint8), spans=(), policy=ADACACHE)
    with pytest.raises(TypeError, match="read-only"):
        plan.policy["moreg"]["norm"] = 0
    with pytest.raises(TypeError, match="read-only"):
        plan.policy["codebook"].append([0.5, "x"])
    with pytest.raises(TypeError, match="read-only"):
        plan.predicted.update(speedup=9.0)
    assert plan.policy == ADACACHE and json.loads(json.dumps(plan.policy)) == ADACACHE
    assert copy.deepcopy(plan) == plan and pickle.loads(pickle.dumps(plan)) == plan
    assert plan.with_changes(policy={**plan.policy, "probe_block": 2}).policy["probe_block"] == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {
                "model": ModelFingerprint("W", "h", tuple(f"b{i}" for i in range(1025))),
                "actions": np.zeros((1025, 6), np.uint8),
            },
            "1 to 1024 blocks",
        ),
        (
            {"timesteps": np.zeros(10_001), "actions": np.zeros((4, 10_001), np.uint8), "sigmas": None},
            "1 to 10000 steps",
        ),
        ({"model": ModelFingerprint("W", "h", ("x" * 2000, "b", "c", "d"))}, "block_ids"),
        ({"provenance": {"profile_settings": {"size_height": 16_385}}}, "size_"),
        (
            {"provenance": {"profile_settings": {"size_height": 8192, "size_width": 8192, "size_num_frames": 5}}},
            "size_",
        ),
        ({"provenance": {"profile_settings": {"size_height": "480"}}}, "size_"),
        ({"provenance": {"profiles": [{"path": 3}]}}, "provenance.profiles"),
        ({"provenance": {"deep": json.loads("[" * 40 + "]" * 40)}}, "nested deeper"),
        ({"predicted": {"speedup": "2x"}}, "predicted.speedup"),
        ({"predicted": {"compute_fraction": 1.5}}, "predicted.compute_fraction"),
        ({"arrays": {"dws_weight": np.full((4, 6), 2.0, np.float32)}}, "dws_weight"),
        ({"arrays": {"pca.3": np.zeros((2, 4, 5), np.float32)}}, "pca.3"),
        ({"arrays": {"pca.9": np.zeros((2, 4, 2), np.float32)}}, "outside the 4 blocks"),
        ({"arrays": {"cost.block_flops": np.ones(3)}}, "cost.block_flops"),
    ],
)
def test_sizes_and_field_types_are_bounded(changes, message):
    with pytest.raises(PlanError, match=message):
        make_plan(**changes)


@pytest.mark.parametrize("where", ["header", "metadata"])
def test_deep_nesting_is_refused_before_parsing(where):
    plan = make_plan()
    deep = "[" * 500 + "]" * 500
    if where == "metadata":
        meta, tensors = raw_parts(plan)
        text = json.dumps(meta, sort_keys=True, separators=(",", ":")).replace('"planner":"test"', f'"planner":{deep}')
        data = save(tensors, metadata={"dit_plan": text, "content_sha256": _checksum(text, tensors)})
    else:
        header = ('{"a":' + deep + "}").encode()
        data = len(header).to_bytes(8, "little") + header
    with pytest.raises(PlanError, match=r"nested 50\d levels deep, more than 16"):
        plan_from_bytes(data)


def test_signed_plans(tmp_path):
    plan = make_plan()
    unsigned, signed = plan_to_bytes(plan), plan_to_bytes(plan, key=KEY)
    assert b"content_hmac_sha256" not in unsigned and b"content_hmac_sha256" in signed
    save_plan(plan, tmp_path / "signed.plan", key=KEY)
    assert load_plan(tmp_path / "signed.plan", key=KEY) == plan and load_plan(tmp_path / "signed.plan") == plan
    assert plan_from_bytes(unsigned) == plan
    with pytest.raises(PlanError, match="not signed"):
        plan_from_bytes(unsigned, key=KEY)
    with pytest.raises(PlanError, match="does not match the key"):
        plan_from_bytes(signed, key=b"another key of enough bytes")
    forged = rewritten(plan, edit_meta=lambda m: m["predicted"].update(error=0.001), key=b"the forger's own key!!")
    with pytest.raises(PlanError, match="does not match the key"):
        plan_from_bytes(forged, key=KEY)
    (tmp_path / "key").write_bytes(KEY + b"\n")
    assert read_key_file(tmp_path / "key") == KEY
    (tmp_path / "short").write_bytes(b"short\n")
    with pytest.raises(PlanError, match="at least 16"):
        read_key_file(tmp_path / "short")
