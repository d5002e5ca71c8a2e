"""examples/train_gpt.py: every parallel shape matches the single-process losses, and
checkpoints move between shapes.

The training jobs use the kernels' PyTorch fallback (``kernels="torch"``): the suite sets
TRITON_INTERPRET=1, under which the kernels would otherwise run in Triton's slow interpreter.
``test_triton_kernels_match_torch_fallback`` runs the real Triton kernels on a tiny model."""
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import train_gpt  # noqa: E402

STEPS = 4
REL = 1e-4


def job_train(shape, steps=STEPS, load_state=None, return_state=False, lr=3e-3):
    tc = train_gpt.TrainConfig(steps=steps, quiet=True, lr=lr, kernels="torch", **shape)
    return train_gpt.train(tc, load_state=load_state, return_state=return_state)


_reference = {}


def reference(run):
    if "losses" not in _reference:
        _reference["losses"] = run(1, job_train, {})[0]["losses"]
    return _reference["losses"]


def _assert_match(losses, ref):
    assert len(losses) == len(ref)
    for step, (a, b) in enumerate(zip(losses, ref), 1):
        assert abs(a - b) <= REL * abs(b), f"step {step}: {a} vs single-process {b}"


SHAPES = {
    "dp2": dict(dp=2),
    "dp2-zero": dict(dp=2, zero=True),
    "tp2": dict(tp=2),
    "pp2-gpipe": dict(pp=2, schedule="gpipe"),
    "pp2-1f1b": dict(pp=2, schedule="1f1b"),
    "pp2-interleaved": dict(pp=2, schedule="interleaved_1f1b"),
    "pp2-1f1b-checkpoint": dict(pp=2, schedule="1f1b", checkpoint=True),
    # every other synchronous schedule (PipeDream-2BW's delayed update is checked in
    # test_parallel_pipeline_runtime.py); Chimera: two replicas, gradients summed across them
    **{f"pp2-{name}": dict(pp=2, schedule=name)
       for name in ("looped_bfs", "zb_h1", "zb_h2", "zb_v", "dualpipe_v", "chimera")},
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_two_rank_shapes_match_single_process(run, name):
    ref = reference(run)
    results = run(2, job_train, SHAPES[name])
    for res in results:  # every rank reports the same loss
        _assert_match(res["losses"], ref)
    assert ref[-1] < ref[0]  # and it does learn


@pytest.mark.parametrize("shape", [dict(dp=2, tp=2), dict(tp=2, pp=2, schedule="1f1b")], ids=["dp2xtp2", "tp2xpp2"])
def test_four_rank_shapes_match_single_process(run, shape):
    ref = reference(run)
    for res in run(4, job_train, shape, timeout=240):
        _assert_match(res["losses"], ref)


def _assert_states_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_moves_between_shapes(run):
    saved_tp2 = run(2, job_train, dict(tp=2), 2, None, True)[0]["state"]
    saved_pp2 = run(2, job_train, dict(pp=2), 2, None, True)[0]["state"]
    assert sorted(saved_tp2) == sorted(saved_pp2)  # the dense model's names at every shape
    # tp2 -> tp1: loading and gathering again gives back the saved tensors bit for bit
    single = run(1, job_train, {}, 1, saved_tp2, True, 0.0)[0]
    _assert_states_equal(single["state"], saved_tp2)
    # pp2 -> dp2: both replicas hold the whole model, equal to what pp2 saved
    for res in run(2, job_train, dict(dp=2), 1, saved_pp2, True, 0.0):
        _assert_states_equal(res["state"], saved_pp2)
    # and the loaded models compute the same loss as the model at the saving shape
    again_tp2 = run(2, job_train, dict(tp=2), 1, saved_tp2, False, 0.0)[0]
    _assert_match(single["losses"], again_tp2["losses"])


def test_example_cli_under_a_minute(tmp_path):
    """The example as a user runs it: its own processes, 20 steps, the timeline picture."""
    import subprocess

    png = tmp_path / "timeline.png"
    root = os.path.dirname(os.path.dirname(os.path.abspath(train_gpt.__file__)))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(train_gpt.__file__), "train_gpt.py"),
         "--pp", "2", "--schedule", "1f1b", "--microbatches", "4", "--steps", "20", "--timeline", str(png)],
        capture_output=True, text=True, timeout=120,
        # the checkout under test, not whichever pycomm the environment has installed
        env={**os.environ, "PYCOMM_KERNELS_BACKEND": "torch",
             "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
    )
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == [str(i) for i in range(1, 21)]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert elapsed < 60, elapsed


TINY = train_gpt.GPTConfig(vocab=16, seq=8, hidden=16, heads=4, kv_heads=2, layers=1, ffn=32)


def job_kernels_forward_backward(tp):
    """One forward+backward of the tiny GPT (embedding, block, head, loss) with each backend."""
    from pycomm import kernels, parallel
    from pycomm.kernels import _interpreter

    torch.set_num_threads(1)
    mesh = parallel.init_mesh(1, tp, 1)
    ids, targets = train_gpt.batch_for_step(TINY, 1, 4, 0)
    out = {}
    for name in ("torch", "triton"):
        with train_gpt.kernels_backend(name):
            parallel.manual_seed(0, mesh.tp_rank)
            model = torch.nn.Sequential(*train_gpt.build_layers(TINY, mesh.tp_group))
            logits = model(ids)
            if tp == 1:
                loss = kernels.softmax_cross_entropy(logits, targets)
            else:
                loss = parallel.vocab_parallel_cross_entropy(logits, targets, mesh.tp_group).mean()
            loss.backward()
            out[name] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    # backend "triton" raises rather than fall back when Triton cannot run, so the interpreter ran
    assert _interpreter.INTERPRETING
    (l_t, g_t), (l_k, g_k) = out["torch"], out["triton"]
    grad_err = max(((g_k[k] - g_t[k]).abs().max() / g_t[k].abs().max().clamp_min(1e-12)).item() for k in g_t)
    return l_t, l_k, grad_err, sorted(g_t)


@pytest.mark.parametrize("tp", [1, 2])
def test_triton_kernels_match_torch_fallback(run, tp):
    """The GPT's kernels (layer_norm, flash_attention with GQA, bias_gelu, and at tp=1
    softmax_cross_entropy) in Triton's interpreter against their PyTorch fallback."""
    for l_torch, l_triton, grad_err, names in run(tp, job_kernels_forward_backward, tp):
        assert abs(l_triton - l_torch) <= 1e-5 * abs(l_torch), (l_triton, l_torch)
        assert grad_err < 1e-4, grad_err
        assert "1.mlp.fc1.bias" in names and "1.ln1.weight" in names


def _losses(stdout: str) -> dict[int, float]:
    """{step: loss} from the example's "step N loss X" lines."""
    out = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "step" and words[2] == "loss":
            out[int(words[1])] = float(words[3])
    return out


def test_example_goes_on_after_losing_a_rank(tmp_path):
    """--dp 4 --kill-rank 2 --at-step 5: the survivors shrink to 3 ranks and redo step 5; from
    there their losses equal a fresh 3-rank run resumed from the checkpoint of step 4."""
    import subprocess

    script = os.path.join(os.path.dirname(train_gpt.__file__), "train_gpt.py")
    env = {**os.environ, "PYCOMM_KERNELS_BACKEND": "torch"}
    common = ["--batch", "12", "--microbatches", "1", "--steps", "6"]
    ck = tmp_path / "step4.pt"
    t0 = time.perf_counter()
    killed = subprocess.run(
        [sys.executable, script, "--dp", "4", "--kill-rank", "2", "--at-step", "5", "--save", str(ck),
         "--save-at", "4", *common], capture_output=True, text=True, timeout=240, env=env)
    assert killed.returncode == 0, killed.stderr
    lost = [line for line in killed.stdout.splitlines() if line.startswith("step 5: lost 1 rank")]
    assert lost and "rank 2 (pid" in lost[0] and "exited" in lost[0] and "going on with 3 ranks" in lost[0], \
        killed.stdout
    fresh = subprocess.run([sys.executable, script, "--dp", "3", "--resume", str(ck), *common],
                           capture_output=True, text=True, timeout=240, env=env)
    assert fresh.returncode == 0, fresh.stderr
    elapsed = time.perf_counter() - t0
    shrunk, resumed = _losses(killed.stdout), _losses(fresh.stdout)
    assert sorted(shrunk) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [5, 6], (killed.stdout, fresh.stdout)
    for step in (5, 6):
        assert abs(shrunk[step] - resumed[step]) <= 1e-6 * abs(resumed[step]), (step, shrunk, resumed)
    assert elapsed < 120, elapsed  # two start-ups of 4 and 3 processes; about 30 s on an idle machine
