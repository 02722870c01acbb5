"""The language-model study end to end on two synthetic "languages", plus its data pieces."""

import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_study as lm_study_config
from fusion_jax import hf_checkpoint as hc
from fusion_jax.data import domains, text, text_tfds, tokenize
from fusion_jax.experiments import lm_study
from fusion_jax.experiments.stages import stack
from fusion_jax.models import lm_fusion

METHODS = [
    "base model (mixture)",
    "own expert per domain (oracle routing)",
    "output ensemble (mean logits)",
    "output ensemble (mean probs)",
    "weight average",
    "task arithmetic",
    "TIES",
    "DARE (linear)",
    "DARE (TIES)",
    "SLERP (lower, upper)",
    "breadcrumbs (TIES)",
    "DELLA",
    "Model Stock",
    "SCE",
    "multi-SLERP",
    "Karcher mean",
    "DAM",
    "DAM, repository init (c = 1/K)",
    "dynamic fusion, frozen experts",
    "dynamic fusion, end to end",
]


def _languages(root):
    """Two languages with disjoint alphabets: lower-case a-m words and upper-case N-Z words."""
    rng = np.random.default_rng(0)
    for name, letters in (("lower", "abcdefghijklm"), ("upper", "NOPQRSTUVWXYZ")):
        os.makedirs(root / name, exist_ok=True)
        for i in range(12):
            words = ["".join(rng.choice(list(letters), rng.integers(2, 7))) for _ in range(120)]
            (root / name / f"{i}.txt").write_text(" ".join(words))
    return f"lower={root / 'lower'},upper={root / 'upper'}"


def _config(tmp_path):
    config = lm_study_config.get_config("tiny")
    config.data.domains = _languages(tmp_path / "text")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.train.base_steps = 10
    config.train.expert_steps = 30
    config.train.fusion_steps = 60
    config.train.log_every = 10
    config.dam.num_steps = 20
    config.train.learning_rate = 3e-3
    config.train.expert_learning_rate = 3e-3
    config.train.fusion_learning_rate = 1e-2
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    config = _config(tmp_path)
    workdir = str(tmp_path / "w")
    return config, workdir, lm_study.run(config, workdir)


def test_table_has_every_method_with_seed_spread(study):
    config, workdir, out = study
    methods = [r["method"] for r in out["rows"]]
    control = [m for m in methods if m.startswith("control: base + ")]
    assert len(control) == 1
    assert [m for m in methods if not m.startswith("control")] == METHODS
    for row in out["rows"]:
        for domain in ("lower", "upper"):
            values = row["bits_per_byte"][domain]
            assert len(values) == config.num_seeds and all(0 < v < 9 for v in values)
    rows = {r["method"]: r for r in out["rows"]}
    # The experts saw their own language: the oracle beats the mixture base on both.
    oracle, base = rows[METHODS[1]], rows[METHODS[0]]
    for d in ("lower", "upper"):
        assert np.mean(oracle["bits_per_byte"][d]) < np.mean(base["bits_per_byte"][d])
    # Costs: fusion runs both experts, merges cost one model; the control matches the FLOPs
    # of the experts plus the frozen fusion (to within one base step).
    assert rows["dynamic fusion, frozen experts"]["flops_per_token"] > 1.5 * base["flops_per_token"]
    assert rows["TIES"]["params"] == base["params"]
    fused = rows["dynamic fusion, frozen experts"]["training_flops"]
    matched = rows[control[0]]["training_flops"]
    assert abs(matched - fused) < 0.05 * fused
    with open(os.path.join(workdir, "comparison.md")) as f:
        table = f.read()
    assert all(f"| {m} |" in table for m in METHODS)
    for name in ("frontier.png", "routing.png", "gate_tokens.png", "comparison.json"):
        assert os.path.exists(os.path.join(workdir, name)), name


def test_gate_routes_the_languages_to_their_experts(study):
    _, _, out = study
    routing = out["routing"]["frozen"]
    # Observed about 0.9 of tokens; chance is 0.5.
    assert np.mean(routing["top_is_own_expert"]) > 0.7, routing
    weights = np.mean(np.asarray(routing["mean_gate_weight"]), 0)  # [text domain, expert]
    assert weights[0, 0] > weights[0, 1] and weights[1, 1] > weights[1, 0], weights


def test_rerun_restores_every_stage_and_reproduces_the_table(study, monkeypatch):
    config, workdir, out = study
    ran = []

    class Recording(lm_study.Stages):
        def run(self, name, fn, abstract):
            return super().run(name, lambda: (ran.append(name), fn())[1], abstract)

    monkeypatch.setattr(lm_study, "Stages", Recording)
    again = lm_study.run(config, workdir)
    assert ran == []  # every stage came from its checkpoint
    for a, b in zip(out["rows"], again["rows"], strict=True):
        assert a["bits_per_byte"] == b["bits_per_byte"], a["method"]
    # The control's length was fixed by the first run (Stages.once), not measured again.
    costs = json.load(open(os.path.join(workdir, "stages", "costs.json")))
    assert costs["control/steps"] == out["control_steps"] == again["control_steps"]


def test_a_number_fixed_once_is_reused_by_every_rerun(tmp_path):
    calls = []
    first = lm_study.Stages(str(tmp_path))
    assert first.once("control/steps", lambda: calls.append(1) or 7) == 7
    assert lm_study.Stages(str(tmp_path)).once("control/steps", lambda: calls.append(1) or 9) == 7
    assert calls == [1]


def test_interrupted_stages_resume_to_the_bits_of_an_uninterrupted_run(
    study, tmp_path, monkeypatch, record_progress
):
    """Killed three times, after time-based saves: in the experts (domains x seeds, step 10 of
    30), in the frozen-expert fusion (its optimizer skips the frozen experts, step 10 of 60), then
    in DAM from the average (it skips the experts it merges, step 10 of 20). Each rerun restores
    the finished
    stages and resumes the stopped one; every bits-per-byte number equals the uninterrupted
    run's, exactly. A stage's end is saved by the stage itself only."""
    config, _, out = study
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every_secs = 1e-9  # save after every chunk
    workdir = str(tmp_path / "w")
    in_progress = os.path.join(workdir, "stages", "in_progress")

    saves, _ = record_progress(stop_after=("experts", 10))
    with pytest.raises(KeyboardInterrupt):
        lm_study.run(config, workdir)
    assert saves == [("experts", 10)]  # the base's 10 steps are one chunk, saved as a stage
    assert os.listdir(in_progress) == ["experts"]

    saves, resumes = record_progress(stop_after=("fusion_frozen", 10))
    with pytest.raises(KeyboardInterrupt):
        lm_study.run(config, workdir)
    assert resumes == [("experts", 10)]
    assert saves == [("experts", 20), ("fusion_frozen", 10)]
    assert os.listdir(in_progress) == ["fusion_frozen"]

    saves, resumes = record_progress(stop_after=("dam_average", 10))
    with pytest.raises(KeyboardInterrupt):
        lm_study.run(config, workdir)
    assert resumes == [("fusion_frozen", 10)]
    assert saves == (
        [("fusion_frozen", s) for s in range(20, 60, 10)]
        + [("control", s) for s in range(10, out["control_steps"], 10)]
        + [("dam_average", 10)]
    )
    assert os.listdir(in_progress) == ["dam_average"]

    saves, resumes = record_progress()
    again = lm_study.run(config, workdir)
    assert resumes == [("dam_average", 10)]
    assert saves == [("dam", 10)] + [("fusion_e2e", s) for s in range(10, 60, 10)]
    assert os.listdir(in_progress) == []
    assert again["control_steps"] == out["control_steps"]
    for a, b in zip(out["rows"], again["rows"], strict=True):
        assert a["bits_per_byte"] == b["bits_per_byte"], a["method"]


def test_an_interrupt_inside_a_chunk_resumes_from_the_last_save(
    study, tmp_path, monkeypatch, record_progress
):
    """The training state is donated to each chunk: an interrupt after the chunk ran but before
    it returned (here inside the fusion's holdout selection) leaves nothing newer than the last
    save, and must not fail saving the deleted state; the rerun resumes there and every number
    equals the uninterrupted run's."""
    config, _, out = study
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every_secs = 1e-9  # save after every chunk
    workdir = str(tmp_path / "w")
    real, calls = lm_study.Study.score, []

    def interrupting(self, logits_fn, params, split="validation", limit=0, **kwargs):
        if split == "holdout" and limit:  # the selection: at step 0, then after each chunk
            calls.append(limit)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(self, logits_fn, params, split, limit, **kwargs)

    monkeypatch.setattr(lm_study.Study, "score", interrupting)
    saves, _ = record_progress()
    with pytest.raises(KeyboardInterrupt):
        lm_study.run(config, workdir)
    assert saves[-1] == ("fusion_frozen", 10)  # the chunk to step 20 never returned
    monkeypatch.setattr(lm_study.Study, "score", real)
    saves, resumes = record_progress()
    again = lm_study.run(config, workdir)
    assert resumes[0] == ("fusion_frozen", 10) and saves[0] == ("fusion_frozen", 20)
    for a, b in zip(out["rows"], again["rows"], strict=True):
        assert a["bits_per_byte"] == b["bits_per_byte"], a["method"]


def test_state_fusion_with_a_trained_head_and_its_decay(study, tmp_path):
    """mix="states" with fusion.train_head: the head starts as the experts' mean head and
    trains; fusion.head_decay pulls it back to that start."""
    config, workdir, _ = study
    moved = {}
    for decay in (0.0, 1e3):
        w = tmp_path / f"decay_{decay}"
        shutil.copytree(os.path.join(workdir, "stages"), w / "stages",
                        ignore=shutil.ignore_patterns("fusion_*"))  # fmt: skip
        c = config.copy_and_resolve_references()
        c.fusion.mix, c.fusion.train_head, c.fusion.head_decay = "states", True, decay
        c.train.fusion_steps, c.fusion.select_windows = 10, 0
        s = lm_study.Study(c, str(w))
        experts = s.experts(s.base())
        params, _, curve = s.fusion(experts, end_to_end=False)
        assert curve is None and set(params) == {"fusion", "head", "experts"}
        start = lm_fusion.mean_head(s.cfg, {"lm_head": {"kernel": experts["lm_head"]["kernel"][0]}})
        moved[decay] = float(jnp.linalg.norm(params["head"]["kernel"][0] - start))
    assert moved[0.0] > 0 and moved[1e3] < 0.2 * moved[0.0], moved


def test_bits_per_byte_on_a_hand_example():
    v = tokenize.ByteTokenizer.vocab_size
    tokens = jnp.asarray([[65, 66, tokenize.ByteTokenizer.eos_id, 67, 0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])  # the last target is padding
    logits = jnp.zeros((1, 4, v))  # uniform: every target costs ln(v) nats
    nll, count = lm_study.bpb_sums(
        logits, tokens, mask, jnp.asarray(tokenize.ByteTokenizer().token_bytes())
    )
    # Three counted targets (66, EOS, 67); EOS covers no byte, so two bytes.
    assert float(count) == 2.0
    assert math.isclose(float(nll), 3 * math.log(v), rel_tol=1e-6)
    assert math.isclose(text.bits_per_byte(float(nll), 2), 1.5 * math.log2(v), rel_tol=1e-6)


def test_tfds_windows_equal_packing_the_split_documents(tmp_path):
    for i in range(7):
        (tmp_path / f"{i}.txt").write_text(f"doc {i} " * (i + 3))
    files = text.expand_sources(str(tmp_path))
    cfg = text_tfds.windows_config("t", files, None, "bytes", 8, 3, 0.3, 0.25)
    windows = text_tfds.load_windows(cfg, str(tmp_path / "tfds"))
    parts = text_tfds.split_docs(text.read_documents(files), 3, 0.3, 0.25)
    names = [sorted(parts[s]) for s in text_tfds.SPLITS]
    docs = sorted(text.read_documents(files))
    assert sorted(sum(names, [])) == docs  # complete and disjoint
    assert all(len(n) > 0 for n in names)
    tok = tokenize.ByteTokenizer()
    for split in text_tfds.SPLITS:
        expected = text.pack([tok.encode(d) for d in parts[split]], 8, tok.eos_id, tok.pad_id)
        np.testing.assert_array_equal(windows[split][0], expected[0])
        np.testing.assert_array_equal(windows[split][1], expected[1])
    # Same recipe and files -> same config name; a changed file -> a new one.
    assert text_tfds.windows_config("t", files, None, "bytes", 8, 3, 0.3, 0.25).name == cfg.name
    (tmp_path / "0.txt").write_text("changed text")
    assert text_tfds.windows_config("t", files, None, "bytes", 8, 3, 0.3, 0.25).name != cfg.name


def test_missing_domain_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(domains, "FORTUNES", str(tmp_path))
    monkeypatch.setitem(
        domains.DOMAINS,
        "de",
        domains.Domain("German fortunes", lambda: domains._plain_files(f"{tmp_path}/de"), "%",
                       "fortunes-de"),
    )  # fmt: skip
    with pytest.raises(FileNotFoundError) as e:
        domains.parse_domains("de")
    assert str(e.value) == (
        "domain 'de' (German fortunes) has no files: install the Debian package with "
        "`apt-get install fortunes-de`"
    )
    with pytest.raises(ValueError) as e:
        domains.parse_domains("klingon")
    assert str(e.value) == (
        "unknown domain 'klingon'; known: en, de, es, it, python (or name=glob for your own)"
    )


def test_english_fortunes_skip_links_and_indexes(tmp_path):
    (tmp_path / "it").mkdir()
    (tmp_path / "it" / "adams").write_text("italiano\n%\n")
    (tmp_path / "wisdom").write_text("a\n%\nb\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\0\1")
    os.symlink(tmp_path / "wisdom", tmp_path / "wisdom.u8")
    os.symlink(tmp_path / "it" / "adams", tmp_path / "adams")
    assert domains._plain_files(str(tmp_path)) == [str(tmp_path / "wisdom")]


def test_python_domain_is_the_standard_library():
    ((name, files, sep),) = domains.parse_domains("python")
    assert name == "python" and sep is None and len(files) > 50
    assert any(f.endswith(os.sep + "json" + os.sep + "__init__.py") for f in files) is False
    assert any(f.endswith(os.sep + "argparse.py") for f in files)


def test_bfloat16_study_computes_in_bfloat16_and_stays_near_float32(tmp_path):
    """config.model.compute_dtype reaches every matmul of the study's training step (forward and
    backward); weights stay float32 and the trained base scores near the float32 one."""
    scores = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(tmp_path)
        config.model.compute_dtype = dtype
        s = lm_study.Study(config, str(tmp_path / dtype))
        base = s.base()
        tokens, mask = s.data.splits["train"][0]
        one = jax.tree.map(lambda x: x[0], base)
        hlo = jax.jit(jax.grad(s.loss)).lower(one, {}, tokens[:4], mask[:4]).as_text()
        dots = re.findall(r"stablehlo\.dot_general .*", hlo)
        assert len(dots) > 10  # forward, input gradients, weight gradients
        assert {t for d in dots for t in re.findall(r"tensor<[\dx]*x(\w+)>", d)} == {
            "f32" if dtype == "float32" else "bf16"
        }
        # config.model.matmul_precision (default "highest") reaches them all too.
        assert {p for d in dots for p in re.findall(r"precision = \[(\w+), \w+\]", d)} == {
            "HIGHEST"
        }
        assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype("float32")}
        scores[dtype] = s.score(s.plain_logits, base)  # bits per byte [seeds, domains]
    # bfloat16 rounds every matmul input to 8 mantissa bits (2^-9 relative); after the base's 10
    # updates the validation bits per byte stay within 1 % of float32's (measured: 0.02 %).
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], rtol=1e-2)
    assert not np.array_equal(scores["bfloat16"], scores["float32"])


def test_config_variants_build_and_unknown_variant_is_refused():
    for variant in (None, "quick", "tiny"):
        cfg = lm_study_config.get_config(variant)
        assert lm_study.model_config(cfg.model).vocab_size == 259
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        lm_study_config.get_config("huge")


def test_loaded_data_matches_the_domains(study):
    config, workdir, _ = study
    data = lm_study.load_data(config, workdir)
    assert data.names == ["lower", "upper"]
    lower = data.splits["train"][0][0]
    # Disjoint alphabets: lower-case text has no upper-case byte, and the reverse.
    assert not np.any((lower >= ord("A")) & (lower <= ord("Z")))
    assert len(lower) <= config.data.max_train_windows


def test_a_cap_keeps_a_seeded_sample_spread_over_the_split():
    # Documents are in file order: the first windows would all come from the first files.
    spread = lm_study._capped(1000, 8, "spread", [0, 1, 2])
    assert spread.tolist() == sorted(set(spread.tolist())) and len(spread) == 8
    assert spread.max() > 500 and spread.min() < 500  # from both halves of the split
    np.testing.assert_array_equal(spread, lm_study._capped(1000, 8, "spread", [0, 1, 2]))
    assert not np.array_equal(spread, lm_study._capped(1000, 8, "spread", [0, 1, 0]))
    assert lm_study._capped(1000, 8, "first", [0, 1, 2]).tolist() == list(range(8))
    for cap in (0, 1000, 2000):  # no cap, or one the split fits
        assert lm_study._capped(1000, cap, "spread", [0]).tolist() == list(range(1000))


def test_a_pretrained_base_is_loaded_scored_untouched_and_its_experts_resume(
    tmp_path, record_progress, tiny_gguf
):
    """model.base: a GGUF file with its own tokenizer. The base is not trained (its row scores
    the file's weights); experts train one after another for the expert domains only, and a kill
    inside the second resumes it to the same bits; the scored-only domain gets the base as its
    oracle; samples come from each domain's prompt."""
    config = _config(tmp_path)
    lower, upper = (d.split("=")[1] for d in _languages(tmp_path / "text").split(","))
    config.data.domains = f"en={lower},de={upper},mixed={lower}|{upper}"
    config.data.expert_domains = "en,de"
    config.model.base = tiny_gguf
    config.train.experts_in_sequence = True
    config.train.checkpoint_every_secs = 1e-9
    config.num_seeds = 1
    workdir = str(tmp_path / "w")
    saves, _ = record_progress(stop_after=("experts/de", 20))
    with pytest.raises(KeyboardInterrupt):
        lm_study.run(config, workdir)
    assert saves == [("experts/en", 10), ("experts/en", 20), ("experts/en", 30),
                     ("experts/de", 10), ("experts/de", 20)]  # fmt: skip
    saves, resumes = record_progress()
    out = lm_study.run(config, workdir)
    assert resumes[:2] == [("experts/en", 30), ("experts/de", 20)]
    assert saves[0] == ("experts/de", 30)

    study = lm_study.Study(config, str(tmp_path / "fresh"))
    assert study.tokenizer.vocab_size == 600 and study.expert_domain == [0, 1]
    rows = {r["method"]: r for r in out["rows"]}
    base = rows["base model (pretrained, untouched)"]
    _, params = hc.load(config.model.base)
    direct = study.score(study.plain_logits, stack([params]))[0]
    np.testing.assert_allclose([base["bits_per_byte"][d][0] for d in study.names], direct)
    oracle = rows["own expert per domain (oracle routing); the base for mixed"]
    assert oracle["bits_per_byte"]["mixed"] == base["bits_per_byte"]["mixed"]
    assert oracle["bits_per_byte"]["en"][0] < base["bits_per_byte"]["en"][0]
    # Uninterrupted experts equal the resumed ones.
    fresh_experts = study.experts(study.base())
    again = lm_study.Study(config, workdir)
    resumed = again.experts(again.base())
    for a, b in zip(jax.tree.leaves(fresh_experts), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(out["samples"]) == {"en", "de"}  # "mixed" has no prompt
    assert set(out["samples"]["de"]["continuations"]) == {
        "base", "expert en", "expert de", "DAM", "TIES", "fusion, frozen experts",
        "fusion, end to end"}  # fmt: skip
    routing = np.asarray(out["routing"]["frozen"]["mean_gate_weight"])
    assert routing.shape == (1, 3, 2)  # seeds, text domains, experts
    # --mode=export: each expert as a folder (the base's tokenizer files) with a GGUF file.
    folders = lm_study.export(config, workdir)
    assert [os.path.basename(f) for f in folders] == ["expert_en", "expert_de"]
    for i, folder in enumerate(folders):
        assert {"tokenizer.json", "tokenizer_config.json", "model.gguf"} <= set(os.listdir(folder))
        want = hc.flatten(jax.tree.map(lambda x, i=i: np.asarray(x[0, i]), resumed))
        for path in (folder, os.path.join(folder, "model.gguf")):
            got = hc.flatten(hc.load(path)[1])
            assert set(got) == set(want)
            for name, x in want.items():
                np.testing.assert_array_equal(got[name], x)


def test_export_needs_a_pretrained_base(study):
    config, workdir, _ = study
    with pytest.raises(lm_study.UserError) as e:
        lm_study.export(config, workdir)
    assert str(e.value) == (
        "--mode=export writes experts of a study on a pretrained base (config.model.base); this "
        "one trained its own byte-level base"
    )


def test_a_pretrained_base_is_checked_before_the_workdir_is_bound(tmp_path, tiny_gguf):
    from fusion_jax import modes
    from fusion_jax.errors import UserError

    config = _config(tmp_path)
    config.model.base = tiny_gguf
    config.model.seq_len = 100
    with pytest.raises(UserError) as e:
        modes.validate(config, devices=1)
    assert str(e.value) == "config.model.seq_len=100: must be at most the base's 64 positions"
    config.model.seq_len = 32
    config.data.expert_domains = "lower"
    with pytest.raises(UserError) as e:
        modes.validate(config, devices=1)
    assert str(e.value) == (
        "config.data.expert_domains='lower': must be '' or 2 or more of the names in "
        "config.data.domains"
    )
    config.data.expert_domains = ""
    config.model.base = str(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        modes.validate(config, devices=1)


def test_a_merge_method_registered_in_merging_is_a_searched_row(study, tmp_path, toy_merge):
    config, workdir, _ = study
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    out = lm_study.run(config, copy)  # stages restored
    (row,) = [r for r in out["rows"] if r["method"] == toy_merge]
    assert [hp["lam"] for hp in row["hparams"]] and all(
        hp == {"lam": hp["lam"]} and hp["lam"] in config.grid.lams for hp in row["hparams"]
    )
