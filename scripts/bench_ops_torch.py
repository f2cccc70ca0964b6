"""PyTorch "peer" timings for the operations measured by `dws bench ops`.

PyTorch is not a project dependency: run this by hand in a throwaway virtual
environment outside the repository::

    python3 -m venv /tmp/torch-venv
    /tmp/torch-venv/bin/pip install torch
    /tmp/torch-venv/bin/python scripts/bench_ops_torch.py > torch.jsonl

Options: ``--threads N`` (default: PyTorch's own thread count), ``--quick``
(element-wise ops and softmax/log_softmax at their first shape only), ``--fixed-grad``
(see below). To compare
with a pinned dws run, pin this one the same way, e.g. ``taskset -c 0,1 python ...``.

Everything is PyTorch eager on the CPU in float32. Each measurement is the median
of timed runs in milliseconds, after 3 warm-up runs; runs continue until at least
1 s has passed and at least 5 runs were made (so at least 10 whenever 10 fit in
~1 s). ``fwd`` times the forward alone (no autograd); ``fwdbwd`` times the forward
plus ``out.backward(torch.ones_like(out))``, the inputs requiring grad and their
``.grad`` reset between runs: burn's ``backward()`` always starts from a ones gradient
that it creates (and fills) inside the timed region, so the peer does the same work.
``--fixed-grad`` instead backpropagates a random gradient made before timing (the
ones fill, about 0.3 ms at [8, 256, 768], is then counted on dws's side only). Inputs are
``torch.randn(shape) * 3`` with ``torch.manual_seed(0)``.

Output is one JSON line per measurement, named like `dws bench ops` so that ratios
can be taken line by line::

    {"bench":"ops/torch/threads","unit":"threads","value":2}
    {"bench":"ops/<op>/<shape>/<fwd|fwdbwd>/torch_ms","unit":"ms","value":1.234}

where <shape> is the (query) input's dims joined by 'x', e.g. 8x256x768.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# The command line (set by main).
args = argparse.Namespace(fixed_grad=False)

ELEMENTWISE = {
    "exp": torch.exp,
    "erf": torch.erf,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
SOFTMAX = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
}
ATTENTION = [
    ("attention", (8, 6, 256, 32), False),
    ("attention", (8, 6, 1024, 32), False),
    ("attention", (8, 6, 256, 64), False),
    ("attention_causal", (8, 6, 256, 32), True),
]


def emit(bench, value, unit):
    line = {"bench": bench, "unit": unit, "value": value}
    print(json.dumps(line, sort_keys=True, separators=(",", ":")), flush=True)


def median_ms(run, reset):
    for _ in range(3):
        reset()
        run()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < 1.0:
        reset()
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(name, fn, shapes):
    """Times fn(*inputs) forward and forward+backward; `shapes` are the input shapes."""
    bench_as(f"{name}/{'x'.join(map(str, shapes[0]))}", fn, shapes)


def bench_as(label, fn, shapes):
    """`bench` with the measurement's name (`ops/<label>/...`) given whole."""
    torch.manual_seed(0)
    inputs = [torch.randn(s) * 3 for s in shapes]
    with torch.no_grad():
        grad = torch.randn(fn(*inputs).shape)
    tag = f"ops/{label}"

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    emit(f"{tag}/fwd/torch_ms", float(f"{median_ms(fwd, lambda: None):.4g}"), "ms")

    leaves = [x.clone().requires_grad_(True) for x in inputs]

    def reset():
        for x in leaves:
            x.grad = None

    def fwdbwd():
        out = fn(*leaves)
        if args.fixed_grad:
            out.backward(grad)
        else:
            # burn's `backward()` starts from a ones gradient it creates in the timed
            # region; so does this, for the same work on both sides.
            out.backward(torch.ones_like(out))

    emit(f"{tag}/fwdbwd/torch_ms", float(f"{median_ms(fwdbwd, reset):.4g}"), "ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    ap.add_argument("--quick", action="store_true", help="element-wise ops and softmax at first shapes only")
    ap.add_argument(
        "--fixed-grad",
        action="store_true",
        help="backward from a gradient made before timing, not a ones gradient made in each run",
    )
    global args
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emit("ops/torch/threads", torch.get_num_threads(), "threads")

    for name, fn in ELEMENTWISE.items():
        bench(name, fn, [(8, 256, 768)])
    softmax_shapes = [(8, 6, 256, 256)] if args.quick else [(8, 6, 256, 256), (64, 1024)]
    for shape in softmax_shapes:
        for name, fn in SOFTMAX.items():
            bench(name, fn, [shape])
    if args.quick:
        return
    # Layer norm over the last dimension, with its scale and shift (their gradients too).
    width = 192
    ln = lambda x, w, b: F.layer_norm(x, (width,), w, b)
    bench("layer_norm", ln, [(8, 256, width), (width,), (width,)])
    # The toy step's linear layers on its [8, 256, 192] tokens: x, weight and bias.
    for d_in, d_out in [(192, 576), (192, 768), (768, 192)]:
        bench_as(f"linear/8x256x{d_in}x{d_out}", F.linear, [(8, 256, d_in), (d_out, d_in), (d_out,)])
    for name, shape, causal in ATTENTION:
        sdpa = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)
        bench(name, sdpa, [shape] * 3)


if __name__ == "__main__":
    main()
