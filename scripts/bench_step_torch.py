"""PyTorch "peer" timings for the training steps measured by `dws bench step`.

PyTorch is not a project dependency: run this by hand in a throwaway virtual
environment outside the repository (see scripts/bench_ops_torch.py), on the same
machine and pinned the same way as the dws run::

    taskset -c 0,1 /tmp/torch-venv/bin/python scripts/bench_step_torch.py --threads 2 > step.jsonl
    taskset -c 0,1 dws bench step --model toy --torch step.jsonl
    taskset -c 0,1 dws bench step --model dit --torch step.jsonl

Both steps are PyTorch eager on the CPU in float32: forward, backward and an AdamW
update (lr 1e-4, weight decay 0.01), on fixed random inputs, loss the mean squared
error to a fixed random target. The reported value is the median of the timed steps
(after 2 warm-up steps), in milliseconds:

- ``toy``: 4 pre-norm blocks (LayerNorm, 6-head attention through
  ``scaled_dot_product_attention``, LayerNorm, 4x MLP with exact GELU) over 8 x 256
  tokens of width 192.
- ``dit-<preset>``: the flow transformer of ``configs/<preset>.toml`` as
  ``crates/models/src/flow_dit.rs`` builds it (patch embedding, anchor embedding,
  learned positions, time MLP, a DWS action module before every adaLN-Zero block with
  full attention, modulated final layer, output gate, warp head upsampled bilinearly)
  at the preset's fine-tuning batch and clip length; the loss adds the mean squared
  displacement when the preset has the warp head. The full and factorised attention
  layouts are both followed; ``input_skip`` too.

Output, one JSON line per step, named like `dws bench step`::

    {"bench":"step/toy/torch_ms","unit":"ms","value":123.4}
"""

import argparse
import json
import math
import os
import statistics
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

LR = 1e-4
WEIGHT_DECAY = 0.01


def emit(bench, value, unit):
    print(json.dumps({"bench": bench, "unit": unit, "value": round(value, 4)}), flush=True)


def attention(qkv_out, heads):
    """[B, L, 3D] -> attention output [B, L, D]."""
    b, l, three_d = qkv_out.shape
    d = three_d // 3
    q, k, v = (
        qkv_out[..., i * d : (i + 1) * d].reshape(b, l, heads, d // heads).transpose(1, 2)
        for i in range(3)
    )
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d)


class ToyBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.proj(attention(self.qkv(self.norm1(x)), self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def zero_linear(i, o):
    layer = nn.Linear(i, o)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ActionModule(nn.Module):
    def __init__(self, d, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.modulation = nn.Linear(cond_dim, 2 * d)
        self.ffn_in = nn.Linear(d, d)
        self.ffn_out = zero_linear(d, d)

    def forward(self, x, c):  # x [B, F, N, D], c [B, F, Dc]
        alpha, beta = self.modulation(c).unsqueeze(2).chunk(2, dim=-1)
        h = modulate(self.norm(x), beta, alpha)
        return x + self.ffn_out(F.gelu(self.ffn_in(h)))


class DitBlock(nn.Module):
    def __init__(self, d, heads, mlp_ratio, factorized):
        super().__init__()
        self.heads = heads
        self.factorized = factorized
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        if factorized:
            self.norm_t = nn.LayerNorm(d)
            self.qkv_t = nn.Linear(d, 3 * d)
            self.proj_t = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)
        self.ada = zero_linear(d, (9 if factorized else 6) * d)

    def forward(self, x, temb):  # x [B, F, N, D], temb [B, F, D]
        b, f, n, d = x.shape
        parts = self.ada(F.silu(temb)).unsqueeze(2).chunk(9 if self.factorized else 6, dim=-1)
        h = modulate(self.norm1(x), parts[0], parts[1])
        seq = h.reshape(b * f, n, d) if self.factorized else h.reshape(b, f * n, d)
        h = self.proj(attention(self.qkv(seq), self.heads)).reshape(b, f, n, d)
        x = x + h * parts[2]
        nxt = 3
        if self.factorized:
            h = modulate(self.norm_t(x), parts[3], parts[4])
            h = h.transpose(1, 2).reshape(b * n, f, d)
            h = self.proj_t(attention(self.qkv_t(h), self.heads))
            x = x + h.reshape(b, n, f, d).transpose(1, 2) * parts[5]
            nxt = 6
        h = modulate(self.norm2(x), parts[nxt], parts[nxt + 1])
        return x + self.fc2(F.gelu(self.fc1(h))) * parts[nxt + 2]


def sincos(n, d):
    half = d // 2
    p = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.sin(p * freq), torch.cos(p * freq)], dim=1)


class Dit(nn.Module):
    def __init__(self, m, cond_dim):
        super().__init__()
        d, p, c = m["width"], m["patch"], m["channels"]
        self.patch, self.heads, self.freqs = p, m["heads"], m["time_freqs"]
        pd = p * p * c
        side = m["image_size"] // p
        self.patch_embed = nn.Linear(pd, d)
        self.anchor_embed = nn.Linear(pd, d) if m.get("anchor_input", False) else None
        axis = sincos(side, d // 2)
        pos = torch.cat(
            [axis[:, None, :].expand(side, side, d // 2), axis[None, :, :].expand(side, side, d // 2)],
            dim=2,
        ).reshape(side * side, d)
        self.pos_space = nn.Parameter(pos)
        self.pos_time = nn.Parameter(sincos(m["max_frames"], d))
        self.time_in = nn.Linear(self.freqs, d)
        self.time_out = nn.Linear(d, d)
        factorized = m.get("attention", "full") == "factorized"
        self.blocks = nn.ModuleList(
            DitBlock(d, m["heads"], m["mlp_ratio"], factorized) for _ in range(m["depth"])
        )
        self.action_modules = nn.ModuleList(ActionModule(d, cond_dim) for _ in range(m["depth"]))
        self.final_norm = nn.LayerNorm(d)
        self.final_mod = zero_linear(d, 2 * d)
        self.final_proj = zero_linear(d, pd)
        self.gate = zero_linear(d, 1) if m.get("output_gate", False) else None
        self.warp = zero_linear(d, 2) if m.get("warp", False) else None
        self.skip = zero_linear(pd, pd) if m.get("input_skip", True) else None

    def patchify(self, x):
        b, f, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b * f, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, f, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x, c, h, w):
        b, f = x.shape[:2]
        p = self.patch
        x = x.reshape(b * f, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, f, c, h, w)

    def forward(self, x, t, cond, anchor):
        b, f, c, h, w = x.shape
        patches = self.patchify(x)
        tokens = self.patch_embed(patches)
        if self.anchor_embed is not None:
            tokens = tokens + self.anchor_embed(self.patchify(anchor))
        n, d = tokens.shape[2], tokens.shape[3]
        x = tokens + self.pos_space.reshape(1, 1, n, d) + self.pos_time[:f].reshape(1, f, 1, d)
        half = self.freqs // 2
        k = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        arg = t[..., None] * 1000.0 * k
        temb = self.time_out(F.silu(self.time_in(torch.cat([arg.cos(), arg.sin()], dim=-1))))
        for module, block in zip(self.action_modules, self.blocks):
            x = block(module(x, cond), temb)
        shift, scale = self.final_mod(F.silu(temb)).unsqueeze(2).chunk(2, dim=-1)
        top = modulate(self.final_norm(x), shift, scale)
        out = self.final_proj(top)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(top))
        if self.skip is not None:
            out = out + self.skip(patches)
        field = None
        if self.warp is not None:
            hp, wp = h // self.patch, w // self.patch
            disp = (self.warp(top) * 4.0).reshape(b * f, hp, wp, 2).permute(0, 3, 1, 2)
            field = F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False)
        return self.unpatchify(out, c, h, w), field


def median_step(step, steps):
    step()
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def toy_step(steps):
    torch.manual_seed(0)
    model = nn.Sequential(*(ToyBlock(192, 6) for _ in range(4)))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x = torch.randn(8, 256, 192)
    target = torch.randn(8, 256, 192)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()

    return median_step(step, steps)


def dit_step(preset_path, steps):
    torch.manual_seed(0)
    with open(preset_path, "rb") as f:
        preset = tomllib.load(f)
    m = preset["model"]
    cond_dim = preset["dws"]["cond_dim"]
    b, f = preset["finetune"]["batch"], preset["finetune"]["clip_len"]
    model = Dit(m, cond_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    shape = (b, f, m["channels"], m["image_size"], m["image_size"])
    x, target, anchor = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t = torch.rand(b, f)
    cond = torch.randn(b, f, cond_dim)

    def step():
        opt.zero_grad(set_to_none=True)
        out, field = model(x, t, cond, anchor)
        loss = F.mse_loss(out, target)
        if field is not None:
            loss = loss + field.pow(2).mean()
        loss.backward()
        opt.step()

    return median_step(step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per model")
    parser.add_argument(
        "--preset",
        default="small",
        help="configs/<preset>.toml (or a path to a preset file) for the dit step",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_path = args.preset
    if not os.path.exists(preset_path):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        preset_path = os.path.join(root, "configs", f"{args.preset}.toml")
    name = os.path.splitext(os.path.basename(preset_path))[0]
    emit("step/torch/threads", torch.get_num_threads(), "threads")
    emit("step/toy/torch_ms", toy_step(args.steps), "ms")
    emit(f"step/dit-{name}/torch_ms", dit_step(preset_path, args.steps), "ms")


if __name__ == "__main__":
    main()
