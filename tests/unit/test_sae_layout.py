"""The SAE folder is a plain SAELens folder: cfg.json + sae_weights.safetensors alone give our codes and
reconstructions on raw activations, with no FineScope normalisation code (the standardisation is folded in)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finescope.curate.sae import load_sae, save_sae, train_sae

D_IN, D_SAE, K = 12, 64, 4


def _raw_acts(n=1500, seed=0):
    """Sparse structure at very different scales: per-coordinate means in ±5, stds from 0.1 to 50."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(48, D_IN, generator=g), dim=1)
    codes = torch.zeros(n, 48).scatter_(
        1, torch.randint(0, 48, (n, 3), generator=g), torch.rand(n, 3, generator=g) * 3 + 0.5
    )
    mean = torch.rand(D_IN, generator=g) * 10 - 5
    std = torch.logspace(-1, torch.log10(torch.tensor(50.0)), D_IN)[torch.randperm(D_IN, generator=g)]
    return (codes @ dictionary) * std + mean


def _saelens_reference(folder):
    """What a standard SAELens loader computes, from the two files only (json + safetensors, nothing of ours)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none" and not cfg.get("rescale_acts_by_decoder_norm", False)

    def encode(x):
        pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
        if cfg["architecture"] == "topk":
            vals, idx = pre.topk(cfg["k"], dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        assert cfg["architecture"] == "standard"
        return pre.relu()

    def decode(z):
        return z @ w["W_dec"] + w["b_dec"]

    return cfg, w, encode, decode


@pytest.fixture(scope="module", params=["topk", "relu"])
def trained(request, tmp_path_factory):
    acts = _raw_acts()
    sae, _ = train_sae(acts, kind=request.param, d_sae=D_SAE, k=K, steps=200, lr=3e-3, batch_size=128, l1=3e-3)
    folder = tmp_path_factory.mktemp(request.param) / "sae"
    save_sae(sae, folder, coords=torch.arange(D_IN), layer=2, model="tiny")
    return request.param, acts, sae, folder


def test_folder_has_saelens_cfg_and_tensors(trained):
    kind, _, _, folder = trained
    cfg, w, _, _ = _saelens_reference(folder)
    assert cfg["architecture"] == ("topk" if kind == "topk" else "standard")
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["dtype"] == "float32"
    assert cfg["apply_b_dec_to_input"] is True and cfg["hook_name"] == "model.layers.2"
    if kind == "topk":
        assert cfg["k"] == K and cfg["activation_fn_kwargs"] == {"k": K}
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
    }
    assert all(t.dtype == torch.float32 for t in w.values())


def test_standard_loader_reproduces_our_codes_on_raw_activations(trained):
    _, acts, sae, folder = trained
    _, _, encode, _ = _saelens_reference(folder)
    x = acts[:400]
    ours = sae.encode(x)
    theirs = encode(x)
    assert (ours > 0).sum(-1).float().mean() > 0.5  # the codes are not trivially empty
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and the cached SAE (loaded back) computes the very same codes as the freshly trained one
    again, _ = load_sae(folder)
    assert torch.equal(again.encode(x), ours)


def test_fold_is_exact_up_to_float_rounding(trained):
    _, acts, sae, _ = trained
    x = acts[:400]
    with torch.no_grad():
        standardised = (sae.normalize(x) - sae.b_dec) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.pre_acts(x), standardised, rtol=1e-5, atol=1e-4)


def test_decode_from_folder_alone_is_in_raw_units(trained):
    _, acts, sae, folder = trained
    _, _, encode, decode = _saelens_reference(folder)
    x = acts[:400]
    x_hat = decode(encode(x))
    with torch.no_grad():  # the unfolded path: decode in standardised units, then undo the standardisation
        recon_n, _, _ = sae.forward_normalized(sae.normalize(x))
        expected = recon_n * sae.input_std + sae.input_mean
    scale = acts.std(0)
    torch.testing.assert_close(x_hat / scale, expected / scale, rtol=1e-4, atol=1e-4)
    assert float((((x_hat - x) / scale) ** 2).mean()) < 0.5  # a real reconstruction of raw x, not of (x − μ)/σ


def test_old_unfolded_folder_still_loads_and_unsupported_cfg_is_refused(trained, tmp_path):
    _, acts, sae, folder = trained
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((folder / "cfg.json").read_text())
    (old / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "finescope_standardize"}))
    save_file({n: t.detach().contiguous() for n, t in sae.state_dict().items()}, str(old / "sae_weights.safetensors"))
    (old / "coords.safetensors").write_bytes((folder / "coords.safetensors").read_bytes())
    loaded, _ = load_sae(old)
    assert torch.equal(loaded.encode(acts[:100]), sae.encode(acts[:100]))
    (old / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    with pytest.raises(ValueError, match="unsupported SAE cfg"):
        load_sae(old)


def test_saelens_itself_loads_the_folder(trained):
    import sae_lens  # in the test extras: a missing package fails here, it is not skipped

    _, acts, sae, folder = trained
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = acts[:400]
    with torch.no_grad():
        z = theirs.encode(x)
        torch.testing.assert_close(z, sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(z), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)
