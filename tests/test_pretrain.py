"""Layer-wise pre-training protocol: determinism, frozen lower layers, config and file handling."""

import dataclasses
import json

import numpy as np
import pytest
from brian2 import ms

from models.parameters import PretrainingParameters
from protocols.config import ConfigError, load_config
from protocols.pretrain import PretrainConfig, load_pretrained, main, pretrain
from protocols.records import atomic_savez

TOPOLOGY = "14x14-3C3-2P-2C3-2P-2FC"


def _config(seed=0):
    return PretrainConfig(topology=TOPOLOGY, device="runtime", seed=seed,
                          pretraining=PretrainingParameters(n_images=4, batch_images=2,
                                                            presentation=10 * ms))


def _images():
    rng = np.random.default_rng(7)
    return (rng.random((4, 14, 14)) * 255).astype(np.uint8)


@pytest.mark.slow  # three pre-training runs: ~2.5 min on 2 cores
def test_same_seed_gives_identical_kernels_and_layers_are_trained_greedily():
    a = pretrain(_config(seed=1), _images(), progress=False)["arrays"]
    b = pretrain(_config(seed=1), _images(), progress=False)["arrays"]
    c = pretrain(_config(seed=2), _images(), progress=False)["arrays"]
    assert set(a) >= {"conv1_kernels", "conv1_thresholds", "conv2_kernels", "conv2_thresholds"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["conv1_kernels"], c["conv1_kernels"])
    assert a["conv1_kernels"].shape == (3, 1, 3, 3) and a["conv2_kernels"].shape == (2, 3, 3, 3)
    # effective thresholds = base + adapted theta; the layer fired, so theta moved
    np.testing.assert_allclose(a["conv1_thresholds"], a["conv1_v_th_base"] + a["conv1_theta"])
    assert a["conv1_spikes_per_image"].sum() > 0 and (a["conv1_theta"] > 0).any()


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('topology = "8x8-2C3-2FC"\n[stdp]\netta = 0.1\n')
    with pytest.raises(ConfigError, match="etta"):
        load_config(bad, PretrainConfig)
    bad.write_text('[stdp]\ntau_pre = 10\n')
    with pytest.raises(ConfigError, match="tau_pre"):
        load_config(bad, PretrainConfig)
    bad.write_text('[homeostasis]\ntau_theta = "5 mV"\n')
    with pytest.raises(ConfigError, match="tau_theta"):
        load_config(bad, PretrainConfig)
    cfg = load_config("configs/pretrain_shallow.toml", PretrainConfig)
    assert cfg.stdp.tau_pre == 10 * ms and cfg.topology == "28x28-36C5-2P-10FC"


def test_npz_is_written_atomically_and_loads_without_pickle(tmp_path):
    path = tmp_path / "run" / "pretrained.npz"
    atomic_savez(path, {"conv1_kernels": np.ones((2, 1, 3, 3)), "seed": np.asarray(3)})
    data = load_pretrained(path)
    assert data["conv1_kernels"].shape == (2, 1, 3, 3) and int(data["seed"]) == 3
    assert [p.name for p in path.parent.iterdir()] == ["pretrained.npz"]  # no temp file left


@pytest.mark.slow  # a two-layer pre-training run through the command line: ~1-5 min
def test_command_line_run_writes_record(tmp_path, monkeypatch, capsys):
    import protocols.datasets as datasets

    class Fake:
        train_images = _images()

    monkeypatch.setattr(datasets, "load_dataset", lambda name, data_dir=None: Fake)
    config = tmp_path / "c.toml"
    config.write_text(f'topology = "{TOPOLOGY}"\ndevice = "runtime"\n[pretraining]\n'
                      f'presentation = "10 ms"\nbatch_images = 2\n')
    out = tmp_path / "out"
    assert main(["--config", str(config), "--n-images", "2", "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "pretrained.json").read_text())
    assert record["seed"] == 0 and "brian2" in record["versions"]
    assert record["config"]["pretraining"]["n_images"] == 2
    assert load_pretrained(out / "pretrained.npz")["conv2_kernels"].shape == (2, 3, 3, 3)
    capsys.readouterr()
    assert main(["--config", str(config), "--device", "gpu", "--out", str(out)]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err  # one line, exit status 2


def test_two_conv_layers_pretrain_on_cpp_standalone():
    """Each conv layer is one standalone program; the second is built after the first has run
    in the same process (Brian2 needs its device re-initialised in between). The deep net's
    default pre-training failed here before models.devices did that."""
    from models.devices import use_device

    cfg = dataclasses.replace(_config(0), device="cpp_standalone")
    try:
        result = pretrain(cfg, _images(), progress=False)
    finally:
        use_device("runtime")
    arrays = result["arrays"]
    assert arrays["conv1_kernels"].shape == (3, 1, 3, 3) and arrays["conv2_kernels"].shape == (2, 3, 3, 3)
    assert set(result["summary"]["layers"]) == {"conv1", "conv2"}
    assert arrays["conv1_spikes_per_image"].sum() > 0


# -- a study reuses a pre-training folder only when it was made under the same configuration --

def test_record_differences_compares_the_offset_as_it_acts_and_reads_old_records():
    from models.parameters import STDPParameters
    from protocols.config import config_to_dict
    from protocols.pretrain import record_differences

    deep = "28x28-20C5-2P-50C5-2P-200FC-10FC"
    constant = config_to_dict(PretrainConfig(topology=deep, stdp=STDPParameters(
        offset=("constant",))))
    # a record from before 'offset' and 'window_scale' existed: the paper's constant offset
    old = json.loads(json.dumps(constant))
    del old["stdp"]["offset"], old["stdp"]["window_scale"]
    assert record_differences(old, constant) == []
    today = config_to_dict(PretrainConfig(topology=deep))  # window_mean, lambda 1.8 then 1
    found = record_differences(old, today)
    assert found == ["stdp offset of conv1: constant chi=0.5 -> window_mean lambda=1.8",
                     "stdp offset of conv2: constant chi=0.5 -> window_mean lambda=1.0"]
    # the same offsets written another way, chi_offset where no layer uses it, and where it ran
    same = config_to_dict(PretrainConfig(topology=deep, device="runtime", out="elsewhere",
                                         stdp=STDPParameters(offset=("window_mean",) * 3,
                                                             window_scale=(1.8, 1.0, 1.0),
                                                             chi_offset=0.3)))
    assert record_differences(same, today) == []
    # the last entry serves deeper layers: constant then window_mean differs at conv 2 only
    mixed = config_to_dict(PretrainConfig(topology=deep, stdp=STDPParameters(
        offset=("constant", "window_mean"))))
    assert record_differences(mixed, constant) == [
        "stdp offset of conv2: window_mean lambda=1.0 -> constant chi=0.5"]
    # anything that changes what is learned is named
    other = json.loads(json.dumps(today))
    other["stdp"]["eta"], other["pretraining"]["n_images"], other["seed"] = 0.005, 300, 4
    assert sorted(record_differences(other, today)) == [
        "pretraining.n_images: 300 -> 1000", "seed: 4 -> 0", "stdp.eta: 0.005 -> 0.002"]
    # a record older than a whole section is not compared on it
    del other["lif"]
    assert not any(d.startswith("lif.") for d in record_differences(other, today))


def test_study_refuses_a_pretraining_folder_made_under_another_stdp(tmp_path, monkeypatch):
    from models.parameters import STDPParameters
    from protocols import pretrain as pt
    from protocols.config import config_to_dict
    from protocols.study import StudyConfig, run_pretraining

    def no_pretraining(argv):
        raise AssertionError("pre-training ran although a matching one was there")

    monkeypatch.setattr(pt, "command", no_pretraining)
    cfg = StudyConfig(topology=TOPOLOGY, arm="pretrained", seed=3)
    folder = tmp_path / "pretrain"
    folder.mkdir()
    (folder / "pretrained.npz").write_bytes(b"kernels")
    made = PretrainConfig(topology=TOPOLOGY, seed=3, out="somewhere/else",
                          stdp=STDPParameters(offset=("constant",)))
    (folder / "pretrained.json").write_text(json.dumps({"config": config_to_dict(made)}))
    with pytest.raises(ConfigError, match=r"another configuration \(stdp offset of conv1: "
                                          r"constant chi=0\.5 -> window_mean lambda=1\.8"):
        run_pretraining(cfg, tmp_path, None, progress=False)
    # the same config (only the folder it was written to differs): reused, not re-run
    made = dataclasses.replace(made, stdp=cfg.stdp)
    (folder / "pretrained.json").write_text(json.dumps({"config": config_to_dict(made)}))
    assert run_pretraining(cfg, tmp_path, None, progress=False) == folder / "pretrained.npz"
    # without its record, pretrain.toml (written before pre-training starts) is read
    (folder / "pretrained.json").unlink()
    (folder / "pretrain.toml").write_text('topology = "14x14-3C3-2P-2C3-2P-2FC"\nseed = 5\n')
    with pytest.raises(ConfigError, match="seed: 5 -> 3"):
        run_pretraining(cfg, tmp_path, None, progress=False)
