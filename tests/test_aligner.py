"The released ThinkDiff aligner weights: the official checkpoint layout, from_official, load_aligner and their errors."
import math
from pathlib import Path
import pytest
import torch
import torch.nn as nn
from thinkdiff_nb.aligner import Aligner, load_aligner

from official_layout import B0, B2, NORM, TIED_ALIAS, W0, W2, projector, write_official


def hand_forward(x: torch.Tensor, t: dict) -> torch.Tensor:
    "Linear, exact GELU, Linear, T5 RMS norm (eps 1e-6, no mean subtraction, no bias), from the raw tensors."
    h = x @ t[W0].T + t[B0]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    y = h @ t[W2].T + t[B2]
    return t[NORM] * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))


def assert_holds(aligner: Aligner, t: dict):
    ours = aligner.state_dict()
    for official, mine in ((W0, "mlp.0.weight"), (B0, "mlp.0.bias"), (W2, "mlp.2.weight"), (B2, "mlp.2.bias"),
                           (NORM, "rms_norm.weight")):
        assert ours[mine].dtype == t[official].dtype and torch.equal(ours[mine], t[official]), mine
    assert set(ours) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "rms_norm.weight"}


class Marker:
    "Unpickling an instance runs `__setstate__`, whose side effect creates the marker file."
    def __init__(self, path): self.path = str(path)
    def __setstate__(self, state):
        Path(state["path"]).write_text("ran")
        self.__dict__.update(state)


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory):
    ("A ThinkDiff-LVLM-sized checkpoint (3584 -> 4096 -> 4096, fp32) in the runner's layout, with the tied T5 "
     "embedding alias.")
    t = projector(3584)
    path = write_official(tmp_path_factory.mktemp("release") / "thinkdiff_lvlm.pth",
                          {**t, TIED_ALIAS: torch.randn(16, 4096).bfloat16()})
    return path, t


def test_file_is_plain_runner_layout(lvlm):
    path, t = lvlm
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: type(v) for k, v in raw.items()} == {"model": dict, "optimizer": dict, "config": dict, "scaler": dict,
                                                    "epoch": int}
    assert sum(t[k].numel() for k in (W0, B0, W2, B2, NORM)) == 31_469_568
    assert 126e6 < path.stat().st_size < 127e6  # 31.5M fp32 values, the size of the projector alone


def test_real_width_round_trip(lvlm, tmp_path):
    path, t = lvlm
    aligner = Aligner.from_official(path, d_vlm=3584, d_t5=4096)
    assert (aligner.config.d_vlm, aligner.config.d_t5, aligner.config.norm) == (3584, 4096, "t5")
    assert sum(p.numel() for p in aligner.parameters()) == 31_469_568
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in aligner.parameters())
    assert_holds(aligner, t)
    assert_holds(Aligner.from_official(path), t)  # widths inferred from the tensors
    aligner.save_pretrained(tmp_path / "aligner")
    assert_holds(Aligner.from_pretrained(tmp_path / "aligner"), t)
    assert_holds(load_aligner(tmp_path / "aligner"), t)
    assert_holds(load_aligner(path), t)
    assert_holds(load_aligner(str(path)), t)


def test_forward_matches_hand_computation(lvlm):
    path, t = lvlm
    aligner = Aligner.from_official(path)
    x = torch.randn(2, 7, 3584, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): got = aligner(x)
    want = hand_forward(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the comparison is sharp enough to tell the tanh GELU or a norm without its weight apart
    h = x @ t[W0].T + t[B0]
    y = nn.functional.gelu(h, approximate="tanh") @ t[W2].T + t[B2]
    assert not torch.allclose(got, t[NORM] * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-5,
                              atol=1e-5)
    assert not torch.allclose(got, want / t[NORM], rtol=1e-3, atol=1e-3)


def test_clip_shaped_file(tmp_path):
    t = projector(1408, seed=2)
    aliases = {"language_model.encoder.embed_tokens.weight": torch.randn(8, 4096).bfloat16(),
               TIED_ALIAS: torch.randn(8, 4096).bfloat16()}
    path = write_official(tmp_path / "thinkdiff_clip.pth", {**t, **aliases})
    aligner = Aligner.from_official(path)
    assert (aligner.config.d_vlm, aligner.config.d_t5) == (1408, 4096)
    assert_holds(aligner, t)
    assert_holds(Aligner.from_official(path, d_vlm=1408, d_t5=4096), t)
    with pytest.raises(ValueError,
                       match=r"mm_projector\.0\.weight has shape \(4096, 1408\): its input width 1408 does not match "
                             r"d_vlm=3584"):
        Aligner.from_official(path, d_vlm=3584)
    with pytest.raises(ValueError,
                       match=r"mm_projector\.2\.weight has shape \(4096, 4096\): its output width 4096 does not match "
                             r"d_t5=2048"):
        Aligner.from_official(path, d_t5=2048)


@pytest.fixture
def small():
    return projector(64, 32, seed=3)


def test_stepped_optimizer_bare_state_dict_and_dtype(small, tmp_path):
    assert_holds(Aligner.from_official(write_official(tmp_path / "stepped.pth", small, step_optimizer=True)), small)
    torch.save(small, tmp_path / "bare.pth")  # base_model.load_checkpoint also reads a bare state dict
    assert_holds(Aligner.from_official(tmp_path / "bare.pth"), small)
    bf16 = projector(64, 32, seed=3, dtype=torch.bfloat16)
    aligner = Aligner.from_official(write_official(tmp_path / "bf16.pth", bf16))
    assert_holds(aligner, bf16)
    assert aligner(torch.randn(1, 2, 64)).dtype == torch.bfloat16


def test_norm_none(small, tmp_path):
    no_norm = {k: v for k, v in small.items() if k != NORM}
    aligner = Aligner.from_official(write_official(tmp_path / "no_norm.pth", no_norm), norm="none")
    assert isinstance(aligner.rms_norm, nn.Identity) and torch.equal(aligner.mlp[2].bias, small[B2])
    with pytest.raises(ValueError, match=r"unexpected \['mm_projector\.3\.weight'\]; norm='none'"):
        Aligner.from_official(write_official(tmp_path / "with_norm.pth", small), norm="none")
    with pytest.raises(ValueError, match=r"missing \['mm_projector\.3\.weight'\]"):
        Aligner.from_official(tmp_path / "no_norm.pth")


def test_wrong_key_name(small, tmp_path):
    bad = {(W0.replace(".0.", ".1.") if k == W0 else k): v for k, v in small.items()}
    with pytest.raises(ValueError,
                       match=r"missing \['mm_projector\.0\.weight'\], unexpected \['mm_projector\.1\.weight'\]"):
        Aligner.from_official(write_official(tmp_path / "wrong_key.pth", bad))


def test_missing_key(small, tmp_path):
    bad = {k: v for k, v in small.items() if k != B2}
    with pytest.raises(ValueError, match=r"missing \['mm_projector\.2\.bias'\], unexpected \[\]"):
        Aligner.from_official(write_official(tmp_path / "missing.pth", bad))


@pytest.mark.parametrize("extra", ["mm_projector.4.weight", "mm_projector.3.bias",
                                   "language_model.decoder.block.0.layer.0.SelfAttention.q.weight"])
def test_extra_key(small, tmp_path, extra):
    with pytest.raises(ValueError, match=rf"missing \[\], unexpected \['{extra}'\]"):
        Aligner.from_official(write_official(tmp_path / "extra.pth", {**small, extra: torch.ones(32)}))


def test_no_projector_keys(small, tmp_path):
    ddp = {f"module.{k}": v for k, v in small.items()}
    with pytest.raises(ValueError, match=r"no mm_projector\.\* keys"):
        Aligner.from_official(write_official(tmp_path / "ddp.pth", ddp))
    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"no mm_projector\.\* keys"):
        Aligner.from_official(tmp_path / "other.pth")


def test_inconsistent_shapes(small, tmp_path):
    bad = {**small, W2: torch.randn(32, 33)}
    with pytest.raises(ValueError, match=r"inconsistent shapes: mm_projector\.2\.weight has shape \(32, 33\)"):
        Aligner.from_official(write_official(tmp_path / "w2.pth", bad))
    with pytest.raises(ValueError, match=r"inconsistent shapes: mm_projector\.3\.weight has shape \(31,\)"):
        Aligner.from_official(write_official(tmp_path / "norm.pth", {**small, NORM: torch.ones(31)}))
    with pytest.raises(ValueError, match=r"inconsistent shapes: mm_projector\.0\.bias has shape \(32, 1\), not 1-D"):
        Aligner.from_official(write_official(tmp_path / "bias.pth", {**small, B0: torch.ones(32, 1)}))
    with pytest.raises(ValueError, match=r"mix dtypes"):
        Aligner.from_official(write_official(tmp_path / "mixed.pth", {**small, B0: small[B0].double()}))


def test_code_needing_pickle_is_refused_before_running(small, tmp_path):
    # control: an ordinary unpickling of such a file does run the side effect
    control = tmp_path / "control_ran"
    write_official(tmp_path / "control.pth", small, note=Marker(control))
    torch.load(tmp_path / "control.pth", map_location="cpu", weights_only=False)
    assert control.read_text() == "ran"
    marker = tmp_path / "side_effect_ran"
    path = write_official(tmp_path / "marker.pth", small, note=Marker(marker))
    with pytest.raises(ValueError, match=r"contains objects that need code to load .*Marker.*refused"):
        Aligner.from_official(path)
    with pytest.raises(ValueError, match=r"contains objects that need code to load"):
        load_aligner(path)
    marker_in_model = write_official(tmp_path / "marker_in_model.pth", {**small, "mm_projector.extra": Marker(marker)})
    with pytest.raises(ValueError, match=r"contains objects that need code to load"):
        Aligner.from_official(marker_in_model)
    assert not marker.exists()


def test_unreadable_and_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no official ThinkDiff checkpoint file"):
        Aligner.from_official(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="expected a save_pretrained folder"):
        load_aligner(tmp_path / "absent.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        Aligner.from_official(tmp_path / "notes.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a checkpoint dict"):
        Aligner.from_official(tmp_path / "list.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        load_aligner(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"official ThinkDiff \.pth file"):
        load_aligner(tmp_path / "weights.bin")
