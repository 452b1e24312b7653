"""End-to-end scale tuning (compress.quant.scale_tuning, `compress tune`)."""

import dataclasses
import json

import pytest
import torch
from compress.kernels import reference
from conftest import ARCH_CASES, checkpoint_tensors, cli_in_process

from compress import models
from compress.calibrate.scale_tuning import (
    ActivationBytes,
    activation_plan,
    measure_activations,
    tune,
)
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme, rtn
from compress.quant.scale_tuning import (
    MAX_FACTOR,
    ScaleTuningConfig,
    TopLogprobs,
    TunableScalesLinear,
    next_token_kl,
)


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, True), (2, 16, False),
                                                         (3, -1, True)])
def test_untrained_scales_give_the_packed_weights_product(bits, group, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(48, 96)
    qw = rtn.quantize(w, QuantScheme(bits, group, symmetric))
    bias = torch.randn(48)
    x = torch.randn(5, 96)
    layer = TunableScalesLinear(qw, bias)
    expected = x @ reference.dequantize(qw.qweight, qw.scales, qw.zeros, qw.g_idx, bits=bits,
                                        group_size=qw.group_size, in_features=96).T + bias
    got = layer(x)
    # float32 both ways: only the product's summation order differs
    assert (got - expected).norm() / expected.norm() < 1e-6
    assert torch.equal(layer.stored_scales(), qw.scales)


def test_a_factor_stays_within_its_bound_and_moves_the_scale():
    qw = rtn.quantize(torch.randn(8, 64), QuantScheme(4, 32, True))
    layer = TunableScalesLinear(qw)
    with torch.no_grad():
        layer.log_factor.fill_(5.0)
    layer.clamp_()
    ratio = layer.scales() / qw.scales.float()
    assert torch.allclose(ratio, torch.full_like(ratio, MAX_FACTOR))


def test_next_token_kl_is_zero_on_the_teachers_own_logits_and_positive_elsewhere():
    logits = torch.randn(2, 5, 11)
    teacher = torch.log_softmax(logits, -1)
    assert float(next_token_kl(logits, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(next_token_kl(logits + torch.randn_like(logits), teacher)) > 0.01


def test_tuning_lowers_the_calibration_kl_of_a_two_layer_net():
    """A toy model: two packed Linears at 2 bits, taught to match the float net's
    distribution; only the scales move, the codes stay."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(32, 16), torch.randn(24, 32) / 4
    scheme = QuantScheme(2, 8, True)
    q1, q2 = rtn.quantize(w1, scheme), rtn.quantize(w2, scheme)

    class Net(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, tokens):
            return self.b(torch.relu(self.a(tokens)))

    tokens = torch.randn(16, 6, 16)
    teacher = torch.log_softmax(torch.relu(tokens @ w1.T) @ w2.T, -1)
    linears = {"a": TunableScalesLinear(q1), "b": TunableScalesLinear(q2)}
    codes = {k: v.codes.clone() for k, v in linears.items()}
    net = Net(linears["a"], linears["b"])
    measured = []

    def measuring(batches: range) -> range:  # the KL before and after: a progress bar
        measured.append(list(batches))
        return batches

    result = tune(net, linears, {}, tokens, lambda pick: teacher[pick],
                  ScaleTuningConfig(epochs=20, lr=2e-2, batch=4, norms=False),
                  measuring=measuring)
    assert measured == [[0, 4, 8, 12]] * 2
    assert result.steps == 80 and result.scales == q1.scales.numel() + q2.scales.numel()
    assert result.kl_tuned < 0.9 * result.kl_start
    assert all(torch.equal(linears[k].codes, codes[k]) for k in codes)
    assert not torch.equal(linears["a"].stored_scales(), q1.scales)


def test_the_teachers_top_tokens_bound_the_kl_from_below_and_keep_its_gradient():
    torch.manual_seed(3)
    vocab = 40
    teacher = torch.log_softmax(3 * torch.randn(2, 6, vocab), -1)
    student = torch.randn(2, 6, vocab, requires_grad=True)
    whole = next_token_kl(student, teacher)
    (grad,) = torch.autograd.grad(whole, student)
    whole = float(whole.detach())
    last = 0.0
    for k in (1, 4, 16, vocab - 1, vocab):
        cut = next_token_kl(student, TopLogprobs.of(teacher, k))
        (cut_grad,) = torch.autograd.grad(cut, student)
        assert torch.isfinite(cut_grad).all(), k
        cut = float(cut.detach())
        assert last - 1e-6 <= cut <= whole + 1e-6, k  # grows with k, to the whole
        last = cut
    assert cut == pytest.approx(whole, rel=1e-6)  # every token kept
    assert torch.allclose(cut_grad, grad, atol=1e-7)
    top = TopLogprobs.of(teacher, 4)
    assert float(next_token_kl(teacher.clone(), top)) == pytest.approx(0.0, abs=1e-6)
    # the rest's total is what the top tokens leave
    total = top.logprobs.exp().sum(-1) + top.rest.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    pick = torch.tensor([1])
    assert torch.equal(top[pick].ids, top.ids[pick]) and top[pick].rest.shape == (1, 6)


def test_teacher_top_setting_round_trips_and_is_omitted_when_automatic():
    assert "teacher_top" not in ScaleTuningConfig().to_dict()
    assert ScaleTuningConfig(teacher_top=0).to_dict()["teacher_top"] == 0
    assert ScaleTuningConfig(**ScaleTuningConfig(teacher_top=64).to_dict()).teacher_top == 64


def test_precision_round_trips_and_is_omitted_at_float32():
    # left out at its default: recipes and saved runs from before it keep their identity
    assert "precision" not in ScaleTuningConfig().to_dict()
    cfg = ScaleTuningConfig(precision="bfloat16")
    assert ScaleTuningConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch": -1}, {"lr": 0.0}, {"lr": 2.0},
                                 {"epochs": True}, {"teacher_top": -1},
                                 {"teacher_top": 2.5}, {"precision": "float16"}])
def test_bad_settings_are_one_line(bad):
    with pytest.raises(CompressError, match="scale tuning"):
        ScaleTuningConfig(**bad)


@pytest.fixture(scope="module")
def packed_tiny(tiny_llama, tmp_path_factory):
    from compress import api
    from compress.recipe import CalibrationConfig, Recipe

    out = tmp_path_factory.mktemp("tune") / "w2"
    recipe = Recipe("gptq", QuantScheme(2, 32, True),
                    calibration=CalibrationConfig(samples=8, seqlen=32))
    api.quantize(tiny_llama, recipe, out, evaluate=False)
    return out


def test_compress_tune_writes_a_checkpoint_with_only_scales_and_norms_changed(
        cli, packed_tiny, tmp_path):
    out = tmp_path / "tuned"
    proc = cli("tune", packed_tiny, "--out", out, "--epochs", "2", "--lr", "0.01", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "calibration KL" in proc.stdout and str(out) in proc.stdout
    before, after = checkpoint_tensors(packed_tiny), checkpoint_tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was tuned"
    assert all(k.endswith(".weight_scale") or "norm" in k for k in changed)
    assert any(k.endswith(".weight_scale") for k in changed)
    assert all(before[k].dtype == after[k].dtype for k in before)
    note = json.loads((out / "scale_tuning.json").read_text())
    assert note["kl_tuned"] < note["kl_start"]
    assert note["calibration"]["samples"] == 8 and note["calibration"]["seqlen"] == 32
    assert note["calibration"]["tokens_sha256"] == json.loads(
        (packed_tiny / checkpoint.MANIFEST).read_text())["calibration"]["tokens_sha256"]
    files = models.open_model(out)  # verifies every file against the manifest
    assert files.manifest["scale_tuning"]["kl_tuned"] == note["kl_tuned"]
    model, _ = models.load(out)
    logits = model(torch.tensor([[1, 42, 7, 99]]))
    assert torch.isfinite(logits).all()
    assert not (out.parent / "tuned.partial").exists()


def test_tuning_against_the_teachers_top_tokens(packed_tiny, tmp_path, monkeypatch):
    """Past the cache size the teacher's top tokens are kept (said once), and the tuning
    still lowers the whole KL; --teacher-top K asks for it and is recorded."""
    from compress import tune as tune_mod

    monkeypatch.setattr(tune_mod, "TEACHER_CACHE_BYTES", 1)  # the whole never fits
    monkeypatch.setattr(tune_mod, "TEACHER_TOP", 8)
    seen = []
    real = tune_mod._teacher

    def spy(*args):
        targets = real(*args)
        seen.append(targets(torch.tensor([0])))
        return targets

    monkeypatch.setattr(tune_mod, "_teacher", spy)
    auto = cli_in_process("tune", packed_tiny, "--out", tmp_path / "auto", "--epochs", "2",
                          "--lr", "0.01")
    assert auto.returncode == 0, auto.stderr
    assert "8 most likely tokens per position" in auto.stderr
    assert isinstance(seen[-1], TopLogprobs) and seen[-1].ids.shape[-1] == 8
    note = json.loads((tmp_path / "auto" / "scale_tuning.json").read_text())
    assert note["kl_tuned"] < note["kl_start"] and "teacher_top" not in note["config"]
    asked = cli_in_process("tune", packed_tiny, "--out", tmp_path / "asked", "--epochs", "2",
                           "--lr", "0.01", "--teacher-top", "16", "-q")
    assert asked.returncode == 0, asked.stderr
    assert seen[-1].ids.shape[-1] == 16
    note = json.loads((tmp_path / "asked" / "scale_tuning.json").read_text())
    assert note["config"]["teacher_top"] == 16 and note["kl_tuned"] < note["kl_start"]
    whole = cli_in_process("tune", packed_tiny, "--out", tmp_path / "whole", "--epochs", "1",
                           "--teacher-top", "0", "-q")
    assert whole.returncode == 0, whole.stderr
    assert isinstance(seen[-1], torch.Tensor)  # recomputed each step, not cut


def test_tune_refuses_bad_input_in_one_line(cli, packed_tiny, tiny_llama, tmp_path):
    proc = cli("tune", tiny_llama, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "not a packed checkpoint" in proc.stderr
    proc = cli("tune", packed_tiny, "--out", packed_tiny)
    assert proc.returncode == 2 and "must differ" in proc.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    proc = cli("tune", packed_tiny, "--out", tmp_path / "taken")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = cli("quantize", tiny_llama, "--tune-epochs", "3", "--out", tmp_path / "z")
    assert proc.returncode == 2 and "add --tune" in proc.stderr
    proc = cli("tune", packed_tiny, "--epochs", "0", "--out", tmp_path / "y")
    assert proc.returncode == 2 and "epochs must be a positive integer" in proc.stderr
    top = cli("tune", packed_tiny, "--teacher-top", "-3", "--out", tmp_path / "y")
    assert top.returncode == 2 and "teacher_top must be a whole number" in top.stderr
    dtype = cli("tune", packed_tiny, "--precision", "float16", "--out", tmp_path / "y")
    assert dtype.returncode == 2 and ("scale tuning precision must be one of float32, "
                                      "bfloat16, got 'float16'") in dtype.stderr
    alone = cli("quantize", tiny_llama, "--tune-precision", "bfloat16", "--out", tmp_path / "z")
    assert alone.returncode == 2 and "add --tune" in alone.stderr
    for p in (proc, top, dtype, alone):
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


FAST_ARCHS = {"llama", "gemma3_text", "qwen2_moe"}  # plain; norm offset + tied head; experts


@pytest.mark.parametrize("model_type", [
    pytest.param(t, marks=() if t in FAST_ARCHS else pytest.mark.slow)
    for t in sorted(ARCH_CASES)])
def test_tuning_lowers_the_calibration_kl_on_every_architecture(model_type, tiny_factory,
                                                                tmp_path):
    from compress import api
    from compress.recipe import Recipe
    from compress.tune import tune_checkpoint

    model = tiny_factory(model_type, **ARCH_CASES[model_type])
    packed = tmp_path / "w2"
    api.quantize(model, Recipe("rtn", QuantScheme(2, 16, True)), packed, evaluate=False)
    s = tune_checkpoint(packed, tmp_path / "tuned", ScaleTuningConfig(epochs=2, lr=1e-2),
                        samples=4, seqlen=32)
    assert s.result.kl_tuned < s.result.kl_start
    before, after = checkpoint_tensors(packed), checkpoint_tensors(tmp_path / "tuned")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith(".weight_scale") for k in changed)
    assert all(k.endswith(".weight_scale") or "norm" in k for k in changed)
    models.open_model(tmp_path / "tuned")  # every file matches the manifest


def test_a_rotated_checkpoint_tunes_against_the_unrotated_base(tiny_llama, tmp_path):
    """The tuned model keeps the checkpoint's rotated embeddings and head; the teacher is
    the base model as it was: both compute the same function before quantisation."""
    from compress import api
    from compress.recipe import Recipe, RotationConfig
    from compress.tune import tune_checkpoint

    packed = tmp_path / "rotated"
    api.quantize(tiny_llama, Recipe("rtn", QuantScheme(3, 16, True),
                                    rotate=RotationConfig("hadamard", 0)), packed,
                 evaluate=False)
    s = tune_checkpoint(packed, tmp_path / "tuned", ScaleTuningConfig(epochs=2, lr=1e-2),
                        samples=4, seqlen=32)
    assert s.result.kl_tuned < s.result.kl_start


def test_an_interrupted_write_leaves_no_partial_copy(packed_tiny, tmp_path, monkeypatch):
    from compress import tune as tuning

    real = tuning.checkpoint.atomic_save_safetensors

    def interrupted(path, *args, **kwargs):  # the checkpoint's write, not the progress's
        if path.parent.name.endswith(".state"):
            return real(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning.checkpoint, "atomic_save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_checkpoint(packed_tiny, tmp_path / "tuned", ScaleTuningConfig(epochs=1))
    # the progress saved after the last step stays for a rerun; no copy of the output does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned.partial.state"]
    monkeypatch.undo()  # the same call then goes on from there and goes through
    tuning.tune_checkpoint(packed_tiny, tmp_path / "tuned", ScaleTuningConfig(epochs=1))
    models.open_model(tmp_path / "tuned")


def _quantize_tiny(model, out, tune_cfg, method="gptq"):
    from compress import api
    from compress.recipe import CalibrationConfig, Recipe

    recipe = Recipe(method, QuantScheme(2, 32, True),
                    calibration=CalibrationConfig(samples=8, seqlen=32), tune=tune_cfg)
    return api.quantize(model, recipe, out, evaluate=False)


def test_quantize_tune_gives_what_compress_tune_gives_on_the_untuned_run(
        cli, tiny_llama, packed_tiny, tmp_path):
    """`quantize --tune` is the untuned run, then `compress tune` with the same settings:
    the same tensors, with the tuning in the recipe and the manifest."""
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--method", "gptq", "--bits", "2", "--group-size", "32",
               "--calib-samples", "8", "--calib-seqlen", "32", "--tune", "--tune-epochs", "1",
               "--no-eval", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    separate = tmp_path / "separate"
    assert cli("tune", packed_tiny, "--out", separate, "--epochs", "1", "-q").returncode == 0
    together, apart = checkpoint_tensors(out), checkpoint_tensors(separate)
    assert together.keys() == apart.keys()
    assert all(torch.equal(together[k], apart[k]) for k in together)
    manifest = models.open_model(out).manifest
    assert manifest["recipe"]["tune"]["epochs"] == 1
    assert manifest["scale_tuning"]["kl_tuned"] < manifest["scale_tuning"]["kl_start"]
    assert (out / "scale_tuning.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "separate"]


def test_the_tuning_precision_reaches_the_steps_from_either_command(
        cli, tiny_llama, packed_tiny, tmp_path):
    """`quantize --tune-precision bfloat16` (overriding a recipe's tuning) and `compress tune
    --precision bfloat16` tune alike, and not as float32 does; the checkpoint records it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nscheme: {bits: 2, group_size: 32}\n"
                      "calibration: {samples: 8, seqlen: 32}\ntune: {epochs: 1}\n")
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--recipe", recipe, "--tune-precision", "bfloat16",
               "--no-eval", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    for precision in ("bfloat16", "float32"):
        done = cli("tune", packed_tiny, "--out", tmp_path / precision, "--epochs", "1",
                   "--precision", precision, "-q")
        assert done.returncode == 0, done.stderr
    together = checkpoint_tensors(out)
    bf16, f32 = (checkpoint_tensors(tmp_path / p) for p in ("bfloat16", "float32"))
    assert all(torch.equal(together[k], bf16[k]) for k in together)
    assert any(not torch.equal(bf16[k], f32[k]) for k in bf16)
    assert models.open_model(out).manifest["recipe"]["tune"]["precision"] == "bfloat16"
    note = json.loads((tmp_path / "bfloat16" / "scale_tuning.json").read_text())
    assert note["config"]["precision"] == "bfloat16"
    assert "precision" not in json.loads(
        (tmp_path / "float32" / "scale_tuning.json").read_text())["config"]


def test_quantize_killed_while_tuning_resumes_to_the_same_checkpoint(tiny_llama, tmp_path,
                                                                      monkeypatch):
    from compress import tune as tuning
    from compress.errors import CompressError as Error

    cfg = ScaleTuningConfig(epochs=1)
    clean = tmp_path / "clean"
    _quantize_tiny(tiny_llama, clean, cfg)
    real = tuning.tune

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "tune", killed)
    out = tmp_path / "out"
    with pytest.raises((KeyboardInterrupt, Error)):
        _quantize_tiny(tiny_llama, out, cfg)
    # the layers are kept, nothing half-tuned is
    assert not out.exists() and not (tmp_path / "out.tuning").exists()
    assert (tmp_path / "out.partial" / "progress.json").is_file()
    monkeypatch.setattr(tuning, "tune", real)
    _quantize_tiny(tiny_llama, out, cfg)
    a, b = checkpoint_tensors(clean), checkpoint_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert not (tmp_path / "out.partial").exists()


def test_rtn_with_tuning_calibrates_only_the_tuning(tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    _quantize_tiny(tiny_llama, out, ScaleTuningConfig(epochs=1), method="rtn")
    manifest = models.open_model(out).manifest
    assert manifest["calibration"] is None  # RTN's rounding saw no data
    assert manifest["recipe"]["calibration"]["samples"] == 8
    note = json.loads((out / "scale_tuning.json").read_text())
    assert note["calibration"]["samples"] == 8 and note["kl_tuned"] < note["kl_start"]


def test_quantize_tune_is_refused_with_several_processes(tiny_llama, tmp_path):
    """Rank 0 would tune alone while the other ranks wait in a collective that times out."""
    from types import SimpleNamespace

    from compress import api
    from compress.recipe import Recipe

    two_ranks = SimpleNamespace(world=2, rank=0, decide=lambda f: f())
    with pytest.raises(CompressError, match="--tune trains the finished checkpoint in one "
                                            "process; drop --workers"):
        api._quantize(tiny_llama, Recipe("rtn", tune=ScaleTuningConfig()), tmp_path / "q",
                      False, False, None, False, 512, 512, None, (), False, two_ranks)
    assert not any(tmp_path.iterdir())


def test_a_step_over_smaller_window_groups_is_the_same_step():
    """`micro`: the step's gradient summed over groups of windows, for large vocabularies;
    the same training up to float rounding."""
    torch.manual_seed(1)
    w = torch.randn(24, 16)
    q = rtn.quantize(w, QuantScheme(2, 8, True))
    tokens = torch.randn(8, 5, 16)
    teacher = torch.log_softmax(tokens @ w.T, -1)
    results = []
    for micro in (None, 1, 3):
        linear = TunableScalesLinear(q)
        results.append((tune(linear, {"a": linear}, {}, tokens, lambda pick: teacher[pick],
                             ScaleTuningConfig(epochs=3, lr=1e-2, batch=4, norms=False),
                             micro=micro), linear.scales().detach()))
    (whole, scales), *others = results
    assert whole.kl_tuned < whole.kl_start
    for result, other_scales in others:
        assert result.kl_start == pytest.approx(whole.kl_start, rel=1e-5)
        assert result.kl_tuned == pytest.approx(whole.kl_tuned, rel=1e-4)
        assert torch.allclose(other_scales, scales, rtol=1e-4)


def test_activation_bytes_count_what_backward_keeps_layer_by_layer():
    """A Linear keeps its input for its weight's gradient: x's bytes exactly, the weight
    itself (held anyway) not; inside a stack each block's internals count once per block
    (the largest), its input once per block, and what comes after the blocks outside."""
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():  # measured with gradients on whatever the caller's mode
        seen = measure_activations(linear, torch.nn.ModuleList(), lambda: linear(x).sum())
    assert seen == ActivationBytes(outside=x.nbytes, layer=0, inputs=0, layers=0)
    model = _Stack()
    x = torch.randn(2, 10, 32)
    whole = torch.nn.Sequential(model, torch.nn.Linear(32, 4))  # with a head
    seen = measure_activations(whole, model.layers, lambda: whole(x).sum())
    hidden = 2 * 10 * 256 * 4  # a block's 256-wide activations, in float32
    assert seen.layers == 6 and seen.inputs == 6 * x.nbytes
    # each block keeps its input (for the first Linear), the GELU's input and output
    assert seen.layer == x.nbytes + 2 * hidden
    assert seen.outside == x.nbytes  # the head's input
    assert seen.kept(False) == x.nbytes + 6 * seen.layer
    assert seen.kept(True) == x.nbytes + 6 * x.nbytes + seen.layer


def _tiny_student(packed_tiny, tiny_llama):
    """The packed tiny model ready to tune: its model, tunable Linears, norms, windows and
    the base model's log-probabilities on them."""
    from compress import tune as tune_mod

    files = models.open_model(packed_tiny)
    student, _ = models.load(files, dtype=torch.float32, head_dtype=torch.float32)
    linears = tune_mod._tunable_linears(student)
    norms = tune_mod._norm_weights(student, files)
    teacher, _ = models.load(tiny_llama, dtype=torch.float32)
    tokens = torch.randint(0, teacher.cfg.vocab_size, (8, 32), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(tokens), -1)
    return student, linears, norms, tokens, lambda pick: logprobs[pick]


class _Stack(torch.nn.Module):
    """Six wide residual blocks: their internals, not a head, are what backward keeps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 32)) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_the_activation_plan_fits_the_memory_it_is_given():
    """Plenty: all windows at once. Less: fewer windows per forward. Less than one
    window's activations: each layer recomputed in the backward pass, which keeps less.
    Less than that: a one-line error naming the fix."""
    model = _Stack()
    x = torch.randn(4, 64, 32)

    def loss_on(k):
        return model(x[:k]).pow(2).mean()

    one = measure_activations(model, model.layers, lambda: loss_on(1)).kept(False)
    assert activation_plan(model, model.layers, loss_on, 4, 4 * one) == (4, False)
    assert activation_plan(model, model.layers, loss_on, 4, 3 * one + 1) == (3, False)
    assert activation_plan(model, model.layers, loss_on, 4, one - 1) == (4, True)
    assert activation_plan(model, model.layers, loss_on, 4, one // 2) == (2, True)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.layers)
    with pytest.raises(CompressError, match=r"scale tuning needs about .* shorter windows"):
        activation_plan(model, model.layers, loss_on, 4, one // 8)


def test_tuning_with_recomputed_layers_is_the_same_tuning(packed_tiny, tiny_llama,
                                                          monkeypatch):
    """Recomputing every layer in the backward pass (and fewer windows per forward)
    changes the time, not the result (up to float rounding), and is recorded."""
    from compress.calibrate import scale_tuning

    cfg = ScaleTuningConfig(epochs=2, lr=1e-2, batch=4)
    runs = []
    for plan in (None, (2, True)):
        if plan is not None:
            monkeypatch.setattr(scale_tuning, "activation_plan", lambda *a, plan=plan: plan)
        student, linears, norms, tokens, teacher = _tiny_student(packed_tiny, tiny_llama)
        result = tune(student, linears, norms, tokens, teacher, cfg,
                      layers=student.model.layers, memory=1 << 40)
        runs.append((result, {k: lin.scales().detach() for k, lin in linears.items()}))
    (plain, scales), (limited, limited_scales) = runs
    assert not plain.recomputed and plain.windows_per_forward == 4
    assert limited.recomputed and limited.windows_per_forward == 2
    assert limited.kl_tuned < limited.kl_start
    assert limited.kl_tuned == pytest.approx(plain.kl_tuned, rel=1e-4)
    for name, value in scales.items():
        assert torch.allclose(limited_scales[name], value, rtol=1e-4), name
    assert not any(type(m).__name__ == "_Recomputed" for m in student.model.layers)


def test_tuning_that_cannot_fit_the_memory_is_a_one_line_error(packed_tiny, tmp_path,
                                                              monkeypatch):
    from compress import tune as tune_mod

    monkeypatch.setattr(tune_mod, "ACTIVATION_SHARE", 1e-12)  # in this process only
    out = tmp_path / "tuned"
    proc = cli_in_process("tune", packed_tiny, "--out", out, "-q")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "scale tuning needs about" in proc.stderr and "--calib-seqlen" in proc.stderr
    assert not out.exists() and not (tmp_path / "tuned.partial").exists()


def _toy_tuning(seed: int):
    """A packed 24 x 16 Linear, 8 windows of 5 inputs, its teacher and a 3-epoch config."""
    torch.manual_seed(seed)
    w = torch.randn(24, 16)
    q = rtn.quantize(w, QuantScheme(2, 8, True))
    tokens = torch.randn(8, 5, 16)
    teacher = torch.log_softmax(tokens @ w.T, -1)
    cfg = ScaleTuningConfig(epochs=3, lr=1e-2, batch=4, norms=False)
    return q, tokens, lambda pick: teacher[pick], cfg


def test_bfloat16_steps_learn_what_float32_steps_learn_and_measure_in_float32():
    """The steps' matmuls in bfloat16 (autocast) take another path than float32's, to
    nearly the same scales; the KL that decides between tuned and untuned is float32's
    either way, so both runs measure the same start to the last bit."""
    q, tokens, teacher, cfg = _toy_tuning(4)
    runs = {}
    for precision in ("float32", "bfloat16"):
        linear = TunableScalesLinear(q)
        result = tune(linear, {"a": linear}, {}, tokens, teacher,
                      dataclasses.replace(cfg, precision=precision))
        runs[precision] = result, linear.scales().detach()
    (f32, scales32), (bf16, scales16) = runs["float32"], runs["bfloat16"]
    assert bf16.kl_start == f32.kl_start
    assert bf16.kl_tuned < 0.9 * bf16.kl_start
    assert bf16.kl_tuned == pytest.approx(f32.kl_tuned, rel=0.05)
    assert not torch.equal(scales16, scales32)  # the autocast did run the steps
    # bfloat16 keeps 8 significant bits (0.4%) of each step's gradient; Adam's steps
    # follow the gradient's sign and scale, so the paths part by far less than they move
    moved = (scales32 - q.scales).abs().max()
    assert (scales16 - scales32).abs().max() < 0.1 * moved
    assert torch.allclose(scales16, scales32, rtol=5e-3)


def test_a_resumed_tuning_ends_where_an_unbroken_one_does():
    """Saved after the starting KL and after every step, the state after step 3 of 6,
    taken up by a fresh model, gives the unbroken run's scales bit for bit (Adam's moments
    and the schedule too); so does the state before any step, which keeps that KL."""
    q, tokens, teacher, cfg = _toy_tuning(1)
    states = []
    linear = TunableScalesLinear(q)
    whole = tune(linear, {"a": linear}, {}, tokens, teacher, cfg,
                 save=states.append, save_every=0)
    assert [s.step for s in states] == [0, 1, 2, 3, 4, 5, 6]
    for saved in (states[3], states[0], states[6]):
        again = TunableScalesLinear(q)
        resumed = tune(again, {"a": again}, {}, tokens, teacher, cfg, resume=saved)
        assert torch.equal(again.scales(), linear.scales())
        assert resumed.kl_start == whole.kl_start and resumed.kl_tuned == whole.kl_tuned


def test_a_resume_keeps_the_saved_runs_windows_per_forward():
    """A run that summed each step over 2 windows per forward, resumed where the whole
    batch of 4 would fit, goes on 2 at a time: its steps are the saved run's exactly."""
    q, tokens, teacher, cfg = _toy_tuning(2)
    states = []
    linear = TunableScalesLinear(q)
    split = tune(linear, {"a": linear}, {}, tokens, teacher, cfg,
                 micro=2, save=states.append, save_every=0)
    assert states[3].micro == 2 and split.windows_per_forward == 2
    again = TunableScalesLinear(q)
    resumed = tune(again, {"a": again}, {}, tokens, teacher, cfg,
                   resume=states[3])
    assert resumed.windows_per_forward == 2
    assert torch.equal(again.scales(), linear.scales())


def _stop_tuning_after(monkeypatch, steps):
    """compress tune's step loop raises KeyboardInterrupt after `steps` steps, as a Ctrl-C
    there would; every step's state is saved."""
    from compress import tune as tune_mod

    real = tune_mod.track

    def track(items, **kw):
        if kw.get("desc") != "tuning steps":
            yield from real(items, **kw)
            return
        for i, item in enumerate(items):
            if i == steps:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(tune_mod, "track", track)
    monkeypatch.setattr(tune_mod, "SAVE_EVERY_SECONDS", 0.0)


def _clean_and_stopped_tunings(packed, tmp_path, monkeypatch, args, steps):
    """`compress tune ARGS` run through into tmp_path/clean, and run into tmp_path/tuned
    but stopped after `steps` steps: the clean output, the stopped one's and its result."""
    clean, out = tmp_path / "clean", tmp_path / "tuned"
    assert cli_in_process("tune", packed, "--out", clean, *args).returncode == 0
    with monkeypatch.context() as m:
        _stop_tuning_after(m, steps)
        stopped = cli_in_process("tune", packed, "--out", out, *args)
    return clean, out, stopped


def test_compress_tune_killed_goes_on_from_its_last_save(packed_tiny, tmp_path, monkeypatch):
    args = ("--epochs", "2", "--lr", "0.01", "-q")
    clean, out, stopped = _clean_and_stopped_tunings(packed_tiny, tmp_path, monkeypatch,
                                                     args, 2)
    assert stopped.returncode != 0 and not out.exists()
    assert "OUT.partial.state" in stopped.stderr
    state = tmp_path / "tuned.partial.state"
    assert json.loads((state / "state.json").read_text())["step"] == 2
    other = cli_in_process("tune", packed_tiny, "--out", tmp_path / "other", "--lr", "0.02", "-q")
    assert other.returncode == 0 and "resuming" not in other.stderr  # its own state dir
    resumed = cli_in_process("tune", packed_tiny, "--out", out, *args[:4])
    assert resumed.returncode == 0 and "resuming the tuning after step 2" in resumed.stderr
    assert not state.exists()
    ours, theirs = checkpoint_tensors(out), checkpoint_tensors(clean)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert json.loads((out / "scale_tuning.json").read_text())["kl_tuned"] == json.loads(
        (clean / "scale_tuning.json").read_text())["kl_tuned"]


def test_a_tuning_killed_before_its_first_step_keeps_its_starting_kl(packed_tiny, tmp_path,
                                                                     monkeypatch):
    """The starting KL is minutes of work on a real model: it is saved before any step,
    and the resumed run, which does not measure it again, ends as an unbroken one."""
    args = ("--epochs", "1", "--lr", "0.01", "-q")
    clean, out, stopped = _clean_and_stopped_tunings(packed_tiny, tmp_path, monkeypatch,
                                                     args, 0)
    assert stopped.returncode != 0
    assert json.loads((tmp_path / "tuned.partial.state" / "state.json").read_text())[
        "step"] == 0
    from compress.calibrate import scale_tuning

    measured = []
    real = scale_tuning.calibration_kl
    monkeypatch.setattr(scale_tuning, "calibration_kl",
                        lambda *a: measured.append(1) or real(*a))
    resumed = cli_in_process("tune", packed_tiny, "--out", out, *args[:4])
    assert resumed.returncode == 0 and "resuming the tuning at its first step" in resumed.stderr
    assert len(measured) == 1  # the closing KL only
    ours, theirs = checkpoint_tensors(out), checkpoint_tensors(clean)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_save_for_other_settings_is_not_used(packed_tiny, tmp_path, monkeypatch):
    from compress import tune as tune_mod

    with monkeypatch.context() as m:
        _stop_tuning_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            tune_mod.tune_checkpoint(packed_tiny, tmp_path / "t",
                                     ScaleTuningConfig(epochs=1, lr=0.01))
    assert (tmp_path / "t.partial.state" / "state.json").exists()
    notes = []
    monkeypatch.setattr(tune_mod, "status", notes.append)
    tune_mod.tune_checkpoint(packed_tiny, tmp_path / "t", ScaleTuningConfig(epochs=1, lr=0.02))
    assert any("for other settings; starting over" in n for n in notes)
    assert not any("resuming" in n for n in notes)
