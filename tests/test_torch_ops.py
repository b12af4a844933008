"""backends/torch_ops.py: every fast path against the plain formula, values and gradients, in fp32
and bf16, for every window (shorter than the row, equal, longer, 1) and odd row lengths.

FlexAttention, which CUDA's compiled blocks run, is checked on a CPU: torch compiles its forward
for a CPU, and its eager form runs the backward once torch's "no backward on CPU" guard is lifted.
The Triton kernels themselves run only on a GPU (tools/gpu_check.py)."""

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention.flex_attention import create_block_mask

from backends import torch_ops

CPU = torch.device("cpu")
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 3e-2  # bf16 keeps 8 significant bits: outputs and gradients of about 1


def qkv(n_kv_head, T, seed=0, head_dim=8, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, head_dim, generator=generator)
    k, v = (torch.randn(2, n_kv_head, T, head_dim, generator=generator) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def values_and_grads(function, q, k, v, window, grad_out):
    out = function(q, k, v, window)
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


def assert_close(got, expected, tolerance):
    scale = max(expected.abs().max().item(), 1.0)
    assert (got.float() - expected.float()).abs().max().item() <= tolerance * scale


def test_window_mask_is_causal_and_limited_to_the_window():
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(torch_ops.window_mask(5, 2, CPU), expected)
    assert torch_ops.window_mask(5, 5, CPU) is None and torch_ops.window_mask(5, 9, CPU) is None


def test_the_reference_is_the_textbook_formula():
    q, k, v = qkv(4, 7, requires_grad=False)
    got = torch_ops.reference_attention(q, k, v, 3)
    for t in range(7):
        keys = slice(max(0, t - 2), t + 1)
        scores = (q[:, :, t:t + 1] @ k[:, :, keys].transpose(-2, -1)) / 8 ** 0.5
        expected = torch.softmax(scores, dim=-1) @ v[:, :, keys]
        assert torch.allclose(got[:, :, t:t + 1], expected, atol=1e-6)


@pytest.mark.parametrize("path", ["blocked", "sdpa", "attention"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("T, window", [(12, 5), (13, 5), (13, 13), (13, 40), (2, 1), (9, 1), (1, 1)])
def test_each_path_equals_the_reference_in_fp32(path, n_kv_head, T, window):
    function = {"blocked": torch_ops.blocked_attention, "sdpa": torch_ops.sdpa_attention,
                "attention": torch_ops.attention}[path]
    q, k, v = qkv(n_kv_head, T)
    grad_out = torch.randn(2, 4, T, 8, generator=torch.Generator().manual_seed(1))
    got, got_grads = values_and_grads(function, q, k, v, window, grad_out)
    expected, expected_grads = values_and_grads(torch_ops.reference_attention, q, k, v, window, grad_out)
    assert_close(got, expected, FP32_TOLERANCE)
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert_close(grad, expected_grad, FP32_TOLERANCE)


@pytest.mark.parametrize("path", ["blocked", "sdpa"])
@pytest.mark.parametrize("T, window", [(13, 5), (16, 16)])
def test_each_path_in_bf16_stays_within_bf16_of_the_fp32_reference(path, T, window):
    function = {"blocked": torch_ops.blocked_attention, "sdpa": torch_ops.sdpa_attention}[path]
    q, k, v = qkv(2, T)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(2, 4, T, 8, generator=torch.Generator().manual_seed(1))
    got, got_grads = values_and_grads(function, *bf16, window, grad_out.bfloat16())
    expected, expected_grads = values_and_grads(torch_ops.reference_attention, q, k, v, window, grad_out)
    assert got.dtype == torch.bfloat16
    assert_close(got, expected, BF16_TOLERANCE)
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert_close(grad, expected_grad, BF16_TOLERANCE)


def test_blocked_attention_never_sees_a_later_key_nor_one_beyond_the_window():
    q, k, v = qkv(2, 20, requires_grad=False)
    t, window = 12, 4
    base = torch_ops.blocked_attention(q, k, v, window)
    later_k, later_v = k.clone(), v.clone()
    later_k[:, :, t + 1:] += 5.0
    later_v[:, :, t + 1:] -= 5.0
    older_k, older_v = k.clone(), v.clone()
    older_k[:, :, :t - window + 1] += 5.0  # query t sees keys t - 3 .. t
    older_v[:, :, :t - window + 1] -= 5.0
    assert torch.allclose(torch_ops.blocked_attention(q, later_k, later_v, window)[:, :, :t + 1],
                          base[:, :, :t + 1], atol=1e-6)
    assert torch.allclose(torch_ops.blocked_attention(q, older_k, older_v, window)[:, :, t:],
                          base[:, :, t:], atol=1e-6)


# FlexAttention -------------------------------------------------------------------------------

FLEX_T = 384  # 3 x 3 blocks of 128: a window of 100 also empties block (2, 0), below the diagonal
EAGER_FLEX_WARNING = "ignore:flex_attention called without torch.compile"


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    from torch.nn.attention import flex_attention as flex_module
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)
    return flex_module.flex_attention


def test_the_block_mask_is_the_window_mask_in_blocks_and_is_built_once_per_shape():
    block_mask = torch_ops.sliding_window_block_mask(FLEX_T, 100, CPU)
    assert torch_ops.sliding_window_block_mask(FLEX_T, 100, CPU) is block_mask
    dense = torch_ops.window_mask(FLEX_T, 100, CPU)
    pos = torch.arange(FLEX_T)
    assert torch.equal(block_mask.mask_mod(0, 0, pos[:, None], pos[None, :]), dense)
    blocks_used = dense.view(3, 128, 3, 128).any(dim=3).any(dim=1)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), blocks_used)
    assert blocks_used.sum() == 5 and not blocks_used[2, 0]  # of 9 blocks, 6 causal, 9 dense


@pytest.mark.parametrize("n_kv_head, window", [(2, 100), (4, 129)], ids=["gqa", "one-block-over"])
def test_compiled_flex_attention_equals_the_reference(n_kv_head, window):
    q, k, v = qkv(n_kv_head, FLEX_T, head_dim=16, requires_grad=False)
    with torch.no_grad():
        got = torch_ops.flex_window_attention(q, k, v, window)
    assert_close(got, torch_ops.reference_attention(q, k, v, window), FP32_TOLERANCE)


def test_compiled_flex_attention_in_bf16_and_with_fp32_queries_stays_close():
    # What CUDA's autocast hands it: rms_norm runs in fp32 there, the value projection in bf16.
    q, k, v = qkv(2, FLEX_T, head_dim=16, requires_grad=False)
    with torch.no_grad():
        mixed = torch_ops.flex_window_attention(q, k, v.bfloat16(), 100)
        bf16 = torch_ops.flex_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 100)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, bf16)
    assert_close(bf16, torch_ops.reference_attention(q, k, v, 100), BF16_TOLERANCE)


@pytest.mark.filterwarnings(EAGER_FLEX_WARNING)
@pytest.mark.parametrize("n_kv_head", [4, 1])
@pytest.mark.parametrize("window", [1, 100, 128, FLEX_T])
def test_flex_attention_gradients_equal_the_reference(flex_backward_on_cpu, n_kv_head, window):
    q, k, v = qkv(n_kv_head, FLEX_T, head_dim=16)
    block_mask = torch_ops.sliding_window_block_mask(FLEX_T, window, CPU)
    grad_out = torch.randn(2, 4, FLEX_T, 16)

    def flex(q, k, v, window):
        return flex_backward_on_cpu(q, k, v, block_mask=block_mask, enable_gqa=n_kv_head != 4)

    got, got_grads = values_and_grads(flex, q, k, v, window, grad_out)
    expected, expected_grads = values_and_grads(torch_ops.reference_attention, q, k, v, window, grad_out)
    assert_close(got, expected, FP32_TOLERANCE)
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert_close(grad, expected_grad, FP32_TOLERANCE)


def test_attention_takes_the_flex_path_only_inside_compiled_code_on_a_flex_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_ops, "flex_window_attention", lambda *args: calls.append(args[3]) or args[0])
    q, k, v = qkv(2, 16, requires_grad=False)
    torch_ops.attention(q, k, v, 8)
    assert calls == []  # a CPU device and eager code: blocked attention
    monkeypatch.setattr(torch_ops, "FLEX_DEVICES", ("cpu",))
    torch_ops.attention(q, k, v, 8)
    assert calls == []  # eager code never builds block masks
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch_ops.attention(q, k, v, 16)
    assert calls == []  # a window as long as the row is plain causal attention
    torch_ops.attention(q, k, v, 8)
    assert calls == [8]


def test_a_compiled_block_runs_flex_attention_in_one_graph(monkeypatch):
    # As CUDA's compiled blocks do (a CPU cannot fuse anything after the attention into it).
    monkeypatch.setattr(torch_ops, "FLEX_DEVICES", ("cpu",))
    q, k, v = qkv(2, 256, head_dim=16, requires_grad=False)
    torch_ops._BLOCK_MASKS.pop((256, 100, CPU), None)
    monkeypatch.setattr(torch_ops, "_COMPILED_FLEX", [])  # its first use is inside compiled code, as on CUDA
    built = []
    from torch.nn.attention import flex_attention as flex_module
    monkeypatch.setattr(flex_module, "create_block_mask", lambda *args, **kwargs: built.append(args[3])
                        or create_block_mask(*args, **kwargs))
    layer = torch.compile(lambda q, k, v: torch_ops.attention(q, k, v, 100), dynamic=False)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        outputs = [layer(q, k, v) for _ in range(3)]
    assert not torch._dynamo.utils.counters["graph_break"]
    assert built == [256]  # the mask is made once, then read from the cache by the retraced graph
    for got in outputs:
        assert_close(got, torch_ops.reference_attention(q, k, v, 100), FP32_TOLERANCE)


# Softcapped linear cross-entropy ---------------------------------------------------------------

SOFTCAP = 15.0


def loss_inputs(rows, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, 32, generator=generator) * 3).to(dtype).requires_grad_()
    weight = (torch.randn(96, 32, generator=generator) * 3).requires_grad_()  # logits beyond the cap
    targets = torch.randint(0, 96, (rows,), generator=generator)
    return x, weight, targets


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [45, 1, 12])  # chunks of 4 and groups of 12: every loop edge
def test_the_chunked_loss_and_its_gradients_equal_the_plain_cross_entropy(monkeypatch, compiled, rows):
    monkeypatch.setattr(torch_ops, "LOSS_CHUNK_ROWS", 4)
    monkeypatch.setattr(torch_ops, "LOSS_GROUP_ROWS", 12)
    x, weight, targets = loss_inputs(rows)
    loss_module = torch_ops.SoftcapLinearCrossEntropy(SOFTCAP)
    if compiled:
        loss_module.compile(dynamic=False)
    expected = torch_ops.reference_softcap_cross_entropy(x, weight, targets, SOFTCAP)
    expected_grads = torch.autograd.grad(expected.mean(), (x, weight))
    with torch.no_grad():
        nats = loss_module(x, weight, targets, reduction="none")
    assert nats.shape == (rows,) and torch.allclose(nats, expected, atol=1e-5)
    loss = loss_module(x, weight, targets)
    assert torch.allclose(loss, expected.mean(), atol=1e-6)
    grads = torch.autograd.grad(3 * loss, (x, weight))  # the incoming gradient scales both
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, 3 * expected_grad, rtol=1e-4, atol=1e-6)


def test_the_chunked_loss_in_bf16_stays_within_bf16_of_the_fp32_formula(monkeypatch):
    monkeypatch.setattr(torch_ops, "LOSS_CHUNK_ROWS", 4)
    x, weight, targets = loss_inputs(13)
    x16 = x.detach().bfloat16().requires_grad_()
    expected = torch_ops.reference_softcap_cross_entropy(x, weight, targets, SOFTCAP)
    expected_grads = torch.autograd.grad(expected.mean(), (x, weight))
    loss = torch_ops.SoftcapLinearCrossEntropy(SOFTCAP)(x16, weight, targets)
    grads = torch.autograd.grad(loss, (x16, weight))
    assert abs(loss.item() - expected.mean().item()) <= BF16_TOLERANCE * expected.mean().item()
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, BF16_TOLERANCE)


def test_the_softcap_chunk_equals_tanh_at_and_far_beyond_the_cap():
    logits = torch.tensor([[-1e4, -30.0, -15.0, 0.0, 1e-3, 15.0, 30.0, 1e4]])
    targets = torch.tensor([5])
    nats = torch_ops.SoftcapChunk(SOFTCAP)(logits, targets)
    expected = F.cross_entropy(SOFTCAP * torch.tanh(logits / SOFTCAP), targets, reduction="none")
    assert torch.isfinite(nats).all() and torch.allclose(nats, expected, atol=1e-5)


# Evaluation's nats -------------------------------------------------------------------------------

def test_target_nats_are_the_cross_entropy_in_float64():
    import numpy as np
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 4
    targets = torch.randint(0, 11, (3, 5), generator=generator).numpy()
    got = torch_ops.target_nats(logits.bfloat16(), targets)
    assert got.dtype == np.float64 and got.shape == (3, 5)
    expected = F.cross_entropy(logits.bfloat16().float().view(15, 11), torch.from_numpy(targets).view(15),
                               reduction="none").view(3, 5).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_target_nats_refuse_anything_but_logits_of_every_position():
    import numpy as np
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4\), expected \(2, 4, 'vocab'\)"):
        torch_ops.target_nats(torch.zeros(2, 4), np.zeros((2, 4), dtype=np.int64))
