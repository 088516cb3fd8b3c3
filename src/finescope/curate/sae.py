"""A small sparse autoencoder over K selected activation coordinates (docs/method.md §2.3), saved in SAELens layout.

Two variants: `topk` (TopK activation, AuxK dead-latent loss; v3, the default) and `relu` (ReLU + L1; v1).
Decoder rows are unit-norm (renormalised after every step, gradient parallel to them removed); the decoder bias
is initialised from the data. Training standardises each input coordinate (mean and std kept with the SAE): the
residual stream has a few "massive" coordinates, hundreds of times larger than the rest, and with a single scale
they dominate the reconstruction and the pooled codes (every record then looks alike, cosine ≈ 0.98–0.999).

Encoding, decoding and the saved folder use the standardisation folded into the weights (`SparseAutoencoder.folded`),
in SAELens's convention on raw activations: codes = act((x − b_dec) @ W_enc + b_enc), with act = ReLU or TopK,
reconstruction = codes @ W_dec + b_dec. So a standard SAELens loader (architecture "standard"/"topk",
normalize_activations "none") reproduces our codes from cfg.json + sae_weights.safetensors alone.

    sae, curves = train_sae(acts, kind="topk", d_sae=2048, k=32, steps=2000)   # acts: (tokens, K) float tensor
    save_sae(sae, "out/sae", coords=indices, layer=15, model="default")
    sae, meta = load_sae("out/sae")
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import cache_entry
from ..progress import progress
from ..storage import atomic_dir


class SparseAutoencoder(nn.Module):
    input_mean: torch.Tensor  # buffers (register_buffer), declared so they type as tensors
    input_std: torch.Tensor

    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int = 32):
        super().__init__()
        if kind not in ("topk", "relu"):
            raise ValueError(f"SAE kind {kind!r}: must be topk or relu")
        self.d_in, self.d_sae, self.kind, self.k = d_in, d_sae, kind, min(k, d_sae)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_mean", torch.zeros(d_in))  # input standardisation: (x − mean) / std
        self.register_buffer("input_std", torch.ones(d_in))
        self._folded_key: tuple | None = None  # memo of `_folded_on`
        self._folded_cache: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            self.normalize_decoder()
            self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row, so the unit-norm constraint does not fight Adam."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The training-time standardisation (x − mean) / std."""
        return (x - self.input_mean) / self.input_std

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """W_enc, b_enc, W_dec, b_dec in raw activation units, the standardisation folded in (SAELens layout).

        With xn = (x − μ)/σ: (xn − b_dec) @ W_enc = (x − (σ·b_dec + μ)) @ (W_enc / σ[:, None]), and
        σ·(z @ W_dec + b_dec) + μ = z @ (W_dec · σ) + (σ·b_dec + μ). b_enc is unchanged. Computed in float64
        on the CPU, returned as float32. Keeping b_dec on the input (rather than folding it into b_enc) subtracts
        the large per-coordinate means before the matmul, so float32 codes stay as accurate as in the standardised
        form. For an SAE loaded from a folded folder (μ = 0, σ = 1) this returns its weights unchanged, bit for bit.
        """
        mean, std, W_enc, b_enc, W_dec, b_dec = (
            t.detach().cpu().double()
            for t in (self.input_mean, self.input_std, self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        )
        return {
            "W_enc": (W_enc / std[:, None]).float(),
            "b_enc": b_enc.float(),
            "W_dec": (W_dec * std).float(),
            "b_dec": (b_dec * std + mean).float(),
        }

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        z = torch.relu(pre)
        if self.kind == "topk":
            vals, idx = z.topk(self.k, dim=-1)
            z = torch.zeros_like(z).scatter_(-1, idx, vals)
        return z

    def _folded_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """`folded()` on `device`, memoised until a weight or buffer changes (in-place updates bump a tensor's
        _version, a move or reassignment changes its storage), so encoding batch after batch folds once."""
        key = (
            str(device),
            *(
                (t.data_ptr(), t._version)
                for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.input_mean, self.input_std)
            ),
        )
        if self._folded_key != key:
            self._folded_cache = {n: t.to(device) for n, t in self.folded().items()}
            self._folded_key = key
        return self._folded_cache

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec) @ W_enc + b_enc of raw activations `x`, by the folded weights (they follow `x`'s device)."""
        w = self._folded_on(x.device)
        return (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes of raw (unnormalised) activations `x` (..., d_in) → (..., d_sae)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the raw activation space: z @ W_dec + b_dec, by the folded weights."""
        w = self._folded_on(z.device)
        return z @ w["W_dec"] + w["b_dec"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, codes, pre-activations) of raw activations `x`, all in raw units."""
        pre = self.pre_acts(x)
        z = self.activate(pre)
        return self.decode(z), z, pre

    def forward_normalized(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: (reconstruction, codes, pre-activations) of an already standardised input `xn`."""
        pre = (xn - self.b_dec) @ self.W_enc + self.b_enc
        z = self.activate(pre)
        return z @ self.W_dec + self.b_dec, z, pre


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ‖x̂ − x‖² / ‖x − mean(x)‖²."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def train_sae(
    acts: torch.Tensor,
    *,
    kind: str = "topk",
    d_sae: int = 2048,
    k: int = 32,
    l1: float = 1e-3,
    auxk_alpha: float = 1 / 32,
    lr: float = 5e-4,
    steps: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
    dead_after: int = 200,
    log_every: int = 50,
) -> tuple[SparseAutoencoder, dict[str, list]]:
    """Train an SAE on `acts` (tokens × d_in). Returns the SAE (eval mode) and curves of FVU, L0, dead fraction."""
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"need a (tokens, d_in) activation matrix with ≥ 2 rows, got {tuple(acts.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    acts = acts.float()
    d_in = acts.shape[1]
    sae = _init_sae(acts, d_sae, kind, k, gen)
    opt = torch.optim.AdamW(sae.parameters(), lr=lr, weight_decay=0.0)
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    k_aux = max(1, d_in // 2)
    curves: dict[str, list] = {"step": [], "fvu": [], "l0": [], "dead_fraction": [], "loss": []}
    bar = progress(range(1, steps + 1), desc=f"train SAE ({kind}, {d_in}→{d_sae})", unit="step")
    for step in bar:
        batch = sae.normalize(acts[torch.randint(0, acts.shape[0], (batch_size,), generator=gen)])
        x_hat, z, pre = sae.forward_normalized(batch)
        recon = fvu(batch, x_hat)
        last_fired = torch.where((z > 0).any(0), torch.zeros_like(last_fired), last_fired + 1)
        dead = last_fired >= dead_after
        loss = recon
        if kind == "relu":
            loss = loss + l1 * z.abs().sum(-1).mean() / math.sqrt(d_in)
        elif auxk_alpha > 0 and dead.any():
            loss = loss + auxk_alpha * _auxk_loss(sae, batch, x_hat, pre, dead, k_aux)
        _optimizer_step(sae, opt, loss)
        if step % log_every == 0 or step == steps:
            _log_curves(curves, step, recon.detach(), loss.detach(), z, dead)
    sae.eval()
    return sae, curves


def _init_sae(acts: torch.Tensor, d_sae: int, kind: str, k: int, gen: torch.Generator) -> SparseAutoencoder:
    """A fresh SAE with the input standardisation and the decoder bias (median) taken from a sample of `acts`."""
    sae = SparseAutoencoder(acts.shape[1], d_sae, kind, k)
    with torch.no_grad():
        sample = acts[torch.randperm(acts.shape[0], generator=gen)[:65536]]
        sae.input_mean.copy_(sample.mean(0))
        sae.input_std.copy_(sample.std(0).clamp_min(1e-6))
        sae.b_dec.copy_(sae.normalize(sample).median(dim=0).values)
    return sae


def _auxk_loss(
    sae: SparseAutoencoder,
    batch: torch.Tensor,
    x_hat: torch.Tensor,
    pre: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK: FVU of the top dead latents reconstructing the residual the live ones left (Gao et al., 2024)."""
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    vals, idx = dead_pre.topk(min(k_aux, int(dead.sum())), dim=-1)
    z_aux = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    residual = (batch - x_hat).detach()
    aux_hat = z_aux @ sae.W_dec
    aux = (aux_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return torch.nan_to_num(aux, nan=0.0)


def _optimizer_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One Adam step that keeps the decoder rows unit-norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()


def _log_curves(
    curves: dict[str, list], step: int, recon: torch.Tensor, loss: torch.Tensor, z: torch.Tensor, dead: torch.Tensor
) -> None:
    """Append one point (FVU, L0, dead fraction, loss) to the training curves."""
    curves["step"].append(step)
    curves["fvu"].append(float(recon))
    curves["l0"].append(float((z > 0).float().sum(-1).mean()))
    curves["dead_fraction"].append(float(dead.float().mean()))
    curves["loss"].append(float(loss))


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """FVU, mean L0 and dead fraction (latents that never fire) of the SAE as it encodes (folded weights, raw
    units) over `acts`. The FVU weighs each coordinate by 1 / its variance over `acts`, so every coordinate counts
    alike (the massive ones do not drown the rest)."""
    acts = acts.float()
    mean, std = acts.mean(0), acts.std(0).clamp_min(1e-6)
    err = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size]
        x_hat, z, _ = sae(x)
        err += float(((x_hat - x) / std).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    tot = float(((acts - mean) / std).pow(2).sum())
    n = acts.shape[0]
    return {"fvu": err / max(tot, 1e-12), "l0": l0 / n, "dead_fraction": float((~fired).float().mean())}


def save_sae(
    sae: SparseAutoencoder,
    path: str | Path,
    *,
    coords: torch.Tensor,
    layer: int,
    model: str,
    extra: dict[str, Any] | None = None,
    checked: bool = False,
) -> Path:
    """SAELens layout: cfg.json + sae_weights.safetensors (the folded W_enc, b_enc, W_dec, b_dec only, see
    `SparseAutoencoder.folded`), plus coords.safetensors, the residual coordinates the SAE reads (its d_in inputs).

    `checked` (a cache entry): both safetensors files carry a checksum and their key (`cache_entry`), and the
    weights' metadata the sha256 of cfg.json, so `load_sae(path, checked=True)` trusts nothing altered."""
    topk = sae.kind == "topk"
    cfg = {
        "architecture": "topk" if topk else "standard",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": sae.k} if topk else {},
        **({"k": sae.k, "rescale_acts_by_decoder_norm": False} if topk else {}),
        "model_name": model,
        "hook_name": f"model.layers.{layer}",
        "hook_layer": layer,
        "hook_head_index": None,
        "finescope_hook_point": "residual stream after the block",
        "finescope_coords_file": "coords.safetensors",
        **(extra or {}),
    }
    text = json.dumps(cfg, indent=2) + "\n"
    weights = {n: t.contiguous() for n, t in sae.folded().items()}
    indices = {"indices": coords.long().contiguous()}
    with atomic_dir(path) as tmp:
        (tmp / "cfg.json").write_text(text)
        if checked:
            final = Path(path)
            meta = {CFG_SHA256: cache_entry.digest(text.encode("utf-8"))}
            blob = cache_entry.dump(weights, cache_entry.shard_key(final / WEIGHTS), meta)
            (tmp / WEIGHTS).write_bytes(blob)
            (tmp / COORDS).write_bytes(cache_entry.dump(indices, cache_entry.shard_key(final / COORDS)))
        else:
            save_file(weights, str(tmp / WEIGHTS))
            save_file(indices, str(tmp / COORDS))
    return Path(path)


WEIGHTS, COORDS, CFG_SHA256 = "sae_weights.safetensors", "coords.safetensors", "finescope_cfg_sha256"


def check_sae(path: str | Path) -> bool:
    """True when the SAE cache folder `path` (saved `checked`) is intact; a bad one is reported in one line and
    removed (so it is trained again), a missing one is False."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        return False
    try:
        _checked_parts(path)
        return True
    except (cache_entry.BadCacheEntry, OSError) as e:
        msg = str(e) if isinstance(e, cache_entry.BadCacheEntry) else f"{path}: unreadable ({e.strerror or e})"
        print(f"finescope: {msg}; recomputing it", file=sys.stderr, flush=True)
        shutil.rmtree(path, ignore_errors=True)
        return False


def _checked_parts(path: Path) -> tuple[str, dict[str, torch.Tensor], torch.Tensor]:
    """(cfg.json's text, the weights, the coordinates) of a checked SAE folder; BadCacheEntry when altered."""
    text = (path / "cfg.json").read_bytes()
    got = cache_entry.load_with_metadata_or_raise(path / WEIGHTS, cache_entry.shard_key(path / WEIGHTS))
    state, meta = got
    if meta.get(CFG_SHA256) != cache_entry.digest(text):
        raise cache_entry.BadCacheEntry(f"{path / 'cfg.json'}: does not match the checksum its SAE weights record")
    coords = cache_entry.load_or_raise(path / COORDS, cache_entry.shard_key(path / COORDS))["indices"]
    return text.decode("utf-8"), state, coords


def _kind(cfg: dict[str, Any]) -> str:
    """Our SAE kind for a SAELens cfg, refusing the settings `SparseAutoencoder` does not compute."""
    arch = cfg.get("architecture", "standard")
    if (
        arch not in ("standard", "topk")
        or not cfg.get("apply_b_dec_to_input", True)
        or cfg.get("normalize_activations", "none") not in ("none", "finescope_standardize")
        or cfg.get("rescale_acts_by_decoder_norm", False)
    ):
        raise ValueError(
            f"unsupported SAE cfg: architecture {arch!r}, apply_b_dec_to_input "
            f"{cfg.get('apply_b_dec_to_input')!r}, normalize_activations "
            f"{cfg.get('normalize_activations')!r}, rescale_acts_by_decoder_norm "
            f"{cfg.get('rescale_acts_by_decoder_norm')!r}"
        )
    return "topk" if arch == "topk" else "relu"


def load_sae(path: str | Path, *, checked: bool = False) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE folder written by `save_sae`; returns the SAE and its cfg (with `coords`, a LongTensor).

    The folder's weights are already in raw units, so the SAE keeps mean 0, std 1 and encodes exactly as the SAE
    that was saved. Older folders that also hold input_mean / input_std (unfolded) load too. `checked`: a cache
    folder saved `checked`, verified first (BadCacheEntry when altered)."""
    path = Path(path)
    if checked:
        text, state, coords = _checked_parts(path)
        cfg = json.loads(text)
    else:
        cfg = json.loads((path / "cfg.json").read_text())
        state = load_file(str(path / WEIGHTS))
        coords = load_file(str(path / cfg.get("finescope_coords_file", COORDS)))["indices"]
    k = cfg.get("k", cfg.get("activation_fn_kwargs", {}).get("k", 32))
    sae = SparseAutoencoder(cfg["d_in"], cfg["d_sae"], _kind(cfg), k)
    with torch.no_grad():
        for name, tensor in state.items():
            getattr(sae, name).copy_(tensor)
    cfg["coords"] = coords
    return sae.eval(), cfg
