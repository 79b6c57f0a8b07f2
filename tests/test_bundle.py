"""The MONAI bundle `bundles/brats_unet3d`: it parses, instantiates, runs through
`python -m monai.bundle` (training, evaluating, inferring, torchrun, verify_net_in_out,
ckpt_export, onnx_export), is the experiment definition of `medseg train`/`cv`, and
wires only medseg builders.

The bundle runs are real subprocesses of the documented commands on tiny
synthetic data (6 cases, 40×40×28), with the same tiny overrides as the CLI runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medseg import __version__
from medseg.config import bundle_dir, experiment, presets, resolve_config
from medseg.errors import MedsegError
from medseg.labels import CHANNELS, CONVENTIONS, REGIONS
from conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_unet3d"
CONFIGS = BUNDLE / "configs"
TRAIN, CPU = CONFIGS / "train.json", CONFIGS / "cpu.json"
EVALUATE, MULTI, INFERENCE = CONFIGS / "evaluate.json", CONFIGS / "multi_gpu_train.json", CONFIGS / "inference.json"
BIN = Path(sys.executable).parent


def bundle_overrides(overrides: list[str]) -> list[str]:
    """medseg ``--set a.b=v`` overrides → ``python -m monai.bundle`` ``--a#b v`` arguments."""
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        out += [f"--{key.replace('.', '#')}", value]
    return out


#: inference.json's model values for the tiny checkpoints: cpu preset + TINY_TRAIN's filters.
TINY_MODEL = bundle_overrides(["model.args.preset=cpu", *(o for o in TINY_TRAIN if o.startswith("model."))])


def files_arg(*files: Path) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def monai_bundle(*args: str, cwd: Path, launcher: list[str] | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "monai.bundle", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(_pristine, tmp_path_factory):
    """A tiny 2-fold split, fold 0 trained and evaluated through the bundle."""
    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    base = tmp_path_factory.mktemp("bundle")
    root = base / "data"
    shutil.copytree(_pristine("brats2023", 6), root)
    ds = discover(root)
    conv, scans = resolve_convention(ds)
    write_datalist(build_datalist(ds, conv, scans, 2, 0, "t"), base / "split.json")
    common = ["--data_root", str(root), "--datalist", str(base / "split.json"), "--fold", "0",
              "--output_dir", str(base / "bundle_run" / "fold_0"), *bundle_overrides(TINY_TRAIN)]
    monai_bundle("run", "training", "--config_file", files_arg(TRAIN, CPU), *common, cwd=base)
    monai_bundle("run", "evaluating", "--config_file", files_arg(TRAIN, CPU, EVALUATE), *common, cwd=base)
    return base, root


# ----------------------------------------------------------------------------- parse + instantiate
@pytest.mark.parametrize("files", [[TRAIN], [TRAIN, CPU], [TRAIN, CPU, EVALUATE], [TRAIN, MULTI]],
                         ids=["train", "train+cpu", "train+cpu+evaluate", "train+multi_gpu"])
def test_train_configs_parse_and_instantiate(files, split):
    datalist, root = split("brats2023")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"data_root": str(root), "datalist": str(datalist), "fold": 0})
    cfg = parser.get_parsed_content("experiment")
    preset = "cpu" if CPU in files else "full"
    assert cfg == resolve_config(preset)          # the CLI's experiment is the bundle's

    net = parser.get_parsed_content("network_def")
    assert isinstance(net, torch.nn.Module)
    meta = parser["_meta_"]["network_data_format"]
    n_in = meta["inputs"]["image"]["num_channels"]
    n_out = meta["outputs"]["pred"]["num_channels"]
    with torch.no_grad():
        y = net.eval()(torch.zeros(1, n_in, 64, 64, 64))
    assert tuple(y.shape) == (1, n_out, 64, 64, 64)
    heads = parser.get_parsed_content("train_network")
    assert any(k.startswith("deep_supervision_heads") for k in heads.state_dict())
    assert not any(k.startswith("deep_supervision_heads") for k in net.state_dict())
    assert isinstance(parser.get_parsed_content("loss"), torch.nn.Module)

    fold = parser.get_parsed_content("fold_data")
    item = parser.get_parsed_content("val_transforms")(fold.val[0])
    assert item["image"].shape[0] == len(CHANNELS) and item["label"].shape[0] == len(REGIONS)
    assert item["image"].shape[1:] == item["label"].shape[1:]
    # train_transforms: what training runs on a patch cut from the preprocessed dataset
    aug = parser.get_parsed_content("train_transforms")
    assert aug.transforms[0].__class__.__name__ == "RandRotateZoomd"
    size = cfg["train"]["patch"]
    patch = aug({"image": torch.ones(4, *size), "label": torch.zeros(1, *size, dtype=torch.uint8)})
    assert list(patch["image"].shape[1:]) == size and list(patch["label"].shape[1:]) == size
    for key in ("training", "evaluating"):
        if key in parser:   # every id the run entry refers to exists (a typo'd reference fails here)
            refs = parser.ref_resolver.find_refs_in_config(parser[key], key)
            assert refs and all(ref in parser for ref in refs), refs


def test_inference_config_parses_and_instantiates(tiny):
    """`network_def` is the architecture of `model` alone (no checkpoint needed);
    `network` loads the checkpoint into it; `predictor` reads its own checkpoint."""
    from medseg.infer import load_model
    base, _ = tiny
    ckpt = base / "bundle_run" / "fold_0" / "checkpoints" / "final.pt"
    raw = json.loads(INFERENCE.read_text())
    assert raw["model"] == json.loads(TRAIN.read_text())["model"]     # the same default as training
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"ckpt_path": str(base / "no_such.pt")})       # network_def never reads it
    full = parser.get_parsed_content("network_def")
    assert full.filters == [32, 64, 128, 256, 320, 320]
    assert not any(k.startswith("deep_supervision_heads") for k in full.state_dict())

    parser.update({"ckpt_path": str(ckpt), "model#args#preset": "cpu", "model#args#filters": [8, 16, 32]})
    net = parser.get_parsed_content("network")
    trained, _ = load_model(ckpt)
    assert not net.training and net.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in net.state_dict().items())
    pre = parser.get_parsed_content("preprocessing")
    predictor = parser.get_parsed_content("predictor")
    # the MONAI form of the engine's own pipeline (medseg.pipeline.preprocess with its spec)
    assert pre.transforms[0].spec == predictor.spec
    assert predictor.meta["spacing"] == resolve_config("cpu", TINY_TRAIN)["data"]["spacing"]


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_network_loader_rejects_other_model_values(tiny, tmp_path):
    """A checkpoint of another architecture than the bundle's `model` values (here
    the full default vs the tiny checkpoint): a medseg error naming both and the
    flag that fixes it, not a partly loaded network."""
    import ast
    base, _ = tiny
    ckpt = base / "bundle_run" / "fold_0" / "checkpoints" / "final.pt"
    r = monai_bundle("ckpt_export", "network", "--config_file", str(INFERENCE), "--ckpt_path", str(ckpt),
                     "--ckpt_file", str(ckpt), "--key_in_ckpt", "model", "--filepath", str(tmp_path / "m.ts"),
                     cwd=tmp_path, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and not (tmp_path / "m.ts").exists()
    found = {"name": "unet3d", "args": {"preset": "cpu", "filters": [8, 16, 32]}}
    expected = {"name": "unet3d", "args": {"preset": "full"}}
    assert (f"medseg: error: {ckpt}: the checkpoint was trained with model {found}, "
            f"but the bundle's model values are {expected}") in r.stderr
    fix = r.stderr.split('--model "', 1)[1].split('"', 1)[0]        # the suggested override works
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"ckpt_path": str(ckpt), "model": ast.literal_eval(fix)})
    assert isinstance(parser.get_parsed_content("network"), torch.nn.Module)


def test_metadata_describes_the_network():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert [v.lower() for v in fmt["inputs"]["image"]["channel_def"].values()] == list(CHANNELS)
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == list(REGIONS)
    assert fmt["inputs"]["image"]["num_channels"] == len(CHANNELS)
    assert fmt["outputs"]["pred"]["num_channels"] == len(REGIONS)
    for name, conv in CONVENTIONS.items():
        assert meta["label_convention"][name]["regions"] == {r: list(v) for r, v in conv.region_labels().items()}
    assert meta["version"] and meta["required_packages_version"]["medseg"] == __version__
    for key in ("monai_version", "pytorch_version", "numpy_version", "task", "description"):
        assert meta[key]
    assert (BUNDLE / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    assert (BUNDLE / "docs" / "README.md").is_file()


@pytest.mark.parametrize("files", [[TRAIN], [TRAIN, CPU]], ids=["full", "cpu"])
def test_network_matches_metadata_shapes(files):
    """MONAI's own check: a fake input of the metadata's shape (64³) → the declared output."""
    from monai.bundle import verify_net_in_out
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=[str(f) for f in files], device="cpu")


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_verify_net_in_out_as_written():
    """The command of the MONAI model zoo, from the bundle folder, as written: the
    full network of inference.json, without weights, on metadata.json's shape."""
    r = monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                     "--config_file", "configs/inference.json", cwd=BUNDLE)
    assert "data shape of network is verified with no error" in r.stderr + r.stdout


# ----------------------------------------------------------------------------- single definition
def _targets(node, out: list[str]) -> list[str]:
    if isinstance(node, dict):
        if "_target_" in node:
            out.append(node["_target_"])
        for v in node.values():
            _targets(v, out)
    elif isinstance(node, list):
        for v in node:
            _targets(v, out)
    return out


def test_bundle_only_wires_medseg_builders():
    """Every component is a medseg builder (or the standard logger): the bundle
    defines no transform, network or loop of its own."""
    from pydoc import locate
    targets = []
    for f in sorted(CONFIGS.glob("*.json")):
        targets += _targets(json.loads(f.read_text()), [])
    assert targets
    for t in targets:
        assert t.startswith("medseg.") or t == "logging.getLogger", t
        obj = locate(t)
        assert callable(obj), t
        if t.startswith("medseg."):
            assert obj.__module__.startswith("medseg"), t


def test_medseg_holds_no_recipe_values():
    """The recipe values live only in the bundle: medseg.config has no defaults, and
    a changed bundle changes what `medseg` trains."""
    import medseg.config as config
    assert not hasattr(config, "DEFAULTS") and not hasattr(config, "PRESETS")
    raw = json.loads(TRAIN.read_text())
    cpu = json.loads(CPU.read_text())
    cfg = resolve_config("cpu")
    assert cfg["train"]["lr"] == cpu["train#lr"] and cfg["train"]["momentum"] == raw["train"]["momentum"]
    assert presets() == ["full", "cpu"]


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_edited_bundle_copy_defines_the_cli_experiment(tmp_path, split):
    datalist, root = split("brats2023")
    copy = tmp_path / "my_bundle"
    shutil.copytree(BUNDLE, copy)
    cpu = json.loads((copy / "configs" / "cpu.json").read_text())
    cpu["train#lr"] = 0.00123
    (copy / "configs" / "cpu.json").write_text(json.dumps(cpu))
    train = json.loads((copy / "configs" / "train.json").read_text())
    train["seed"] = 7
    (copy / "configs" / "train.json").write_text(json.dumps(train))
    out = tmp_path / "run"
    r = subprocess.run([str(BIN / "medseg"), "train", "--bundle", str(copy), "--preset", "cpu",
                        "--datalist", str(datalist), "--data-root", str(root), "--fold", "0",
                        "--out", str(out), *[a for o in TINY_TRAIN for a in ("--set", o)],
                        "--set", "train.epochs=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = json.loads((out / "config.json").read_text())
    assert written["train"]["lr"] == 0.00123 and written["seed"] == 7
    assert written == resolve_config("cpu", [*TINY_TRAIN, "train.epochs=1"], bundle=copy)
    ck = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    assert ck["config"] == written


def test_bad_bundle_inputs_are_clear_errors(tmp_path):
    with pytest.raises(MedsegError, match="unknown preset 'gpu'.*full, cpu"):
        resolve_config("gpu")
    with pytest.raises(MedsegError, match="no configs/train.json"):
        bundle_dir(tmp_path)
    with pytest.raises(MedsegError, match="not a folder, nor a bundle shipped"):
        bundle_dir("no_such_bundle")
    cfg = resolve_config("cpu")
    cfg["train"]["epocs"] = 3
    with pytest.raises(MedsegError, match=r"unknown keys \['train.epocs'\]"):
        experiment(**cfg)


# ----------------------------------------------------------------------------- runs via monai.bundle
@pytest.mark.slow   # 8-20 s on 2 cores: `make test-slow`
def test_bundle_run_equals_cli_run(tiny, tmp_path):
    """`monai.bundle run training` + `run evaluating` and `medseg cv --fold 0` with the
    same seed and overrides: identical training history, weights and metrics."""
    base, root = tiny
    bundle_fold = base / "bundle_run" / "fold_0"
    cli = tmp_path / "cli_run"
    r = subprocess.run([str(BIN / "medseg"), "cv", "--preset", "cpu", "--datalist", str(base / "split.json"),
                        "--data-root", str(root), "--fold", "0", "--out", str(cli),
                        *[a for o in TINY_TRAIN for a in ("--set", o)]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli_fold = cli / "fold_0"
    assert json.loads((bundle_fold / "config.json").read_text()) == json.loads((cli / "config.json").read_text())
    b_sum = json.loads((bundle_fold / "train_summary.json").read_text())
    c_sum = json.loads((cli_fold / "train_summary.json").read_text())
    timing = {k: b_sum["final"][k] for k in ("seconds", "data_wait")}
    assert b_sum["final"] == {**c_sum["final"], **timing}
    assert "dice_TC" in b_sum["final"]
    wb = torch.load(bundle_fold / "checkpoints" / "final.pt", weights_only=True)["model"]
    wc = torch.load(cli_fold / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(wb[k], wc[k]) for k in wc) and wb.keys() == wc.keys()
    assert (bundle_fold / "metrics.csv").read_text() == (cli_fold / "metrics.csv").read_text()
    summary = json.loads((bundle_fold / "summary.json").read_text())
    assert set(summary["overall"]) >= set(REGIONS)


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_bundle_inferring_writes_masks_on_input_grids(tiny, tmp_path):
    base, root = tiny
    ckpt = base / "bundle_run" / "fold_0" / "checkpoints" / "final.pt"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    monai_bundle("run", "inferring", "--config_file", str(INFERENCE), "--ckpt_path", str(ckpt),
                 "--input", str(root), "--output_dir", str(tmp_path / "bundle_masks"), cwd=tmp_path)
    r = subprocess.run([str(BIN / "medseg"), "predict", "--model", str(ckpt), "--input", str(root),
                        "--out", str(tmp_path / "cli_masks")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(cases) == 6
    for case in cases:
        mask = nib.load(tmp_path / "bundle_masks" / f"{case.name}.nii.gz")
        ref = nib.load(next(case.glob("*-t1n.nii.gz")))
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
        assert np.array_equal(np.asarray(mask.dataobj),
                              np.asarray(nib.load(tmp_path / "cli_masks" / f"{case.name}.nii.gz").dataobj))
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
@pytest.mark.parametrize("command", ["ckpt_export", "onnx_export"])
def test_bundle_export_equals_pytorch(command, tiny, tmp_path):
    """MONAI's exporters on a trained checkpoint, as the bundle README writes them
    (model values on the command line): the TorchScript / ONNX network gives the
    checkpoint's PyTorch output on a random input of the metadata's shape."""
    from medseg.infer import load_model
    base, _ = tiny
    ckpt = base / "bundle_run" / "fold_0" / "checkpoints" / "final.pt"
    out = tmp_path / ("model.ts" if command == "ckpt_export" else "network.onnx")
    onnx_args = ["--use_trace", "True", "--converter_kwargs", "{'dynamo': False}"]
    monai_bundle(command, "network_def", "--config_file", str(INFERENCE),
                 "--meta_file", str(CONFIGS / "metadata.json"), "--ckpt_file", str(ckpt),
                 "--key_in_ckpt", "model", *TINY_MODEL, *(onnx_args if command == "onnx_export" else []),
                 "--filepath", str(out), cwd=tmp_path)
    model, _ = load_model(ckpt)
    x = torch.randn(1, 4, 64, 64, 64)
    with torch.no_grad():
        ref = model(x)
    if command == "ckpt_export":
        extra = {"metadata.json": "", "inference.json": ""}
        ts = torch.jit.load(str(out), _extra_files=extra)
        assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["num_channels"] == 4
        with torch.no_grad():
            got = ts(x)
    else:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape == [1, 4, 64, 64, 64]
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == ref.shape == (1, 3, 64, 64, 64)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_bundle_torchrun_multi_gpu_train(tiny, tmp_path):
    base, root = tiny
    out = tmp_path / "ddp"
    args = ["run", "training", "--config_file", files_arg(TRAIN, CPU, MULTI), "--data_root", str(root),
            "--datalist", str(base / "split.json"), "--fold", "1", "--output_dir", str(out),
            *bundle_overrides(TINY_TRAIN)]
    monai_bundle(*args, cwd=tmp_path,
                 launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    # multi_gpu_train.json without torchrun: a clear error, no traceback, nothing trained.
    r = monai_bundle(*args[:-2 * len(TINY_TRAIN)], "--output_dir", str(tmp_path / "single"), cwd=tmp_path,
                     check=False)
    assert r.returncode != 0
    assert "medseg: error: distributed training was requested" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "single" / "train_summary.json").exists()


def test_resolved_config_reruns_through_the_bundle(tiny):
    """A run's config.json is an overlay that gives the bundle the same experiment."""
    base, _ = tiny
    written = base / "bundle_run" / "fold_0" / "config.json"
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(written)])
    assert parser.get_parsed_content("experiment") == json.loads(written.read_text())


# ----------------------------------------------------------------------------- packaging
@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_bundle_ships_inside_the_package(tmp_path):
    """The wheel holds the bundle as medseg/bundles/brats_unet3d, byte-identical."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("medseg-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "medseg/bundles/__init__.py" in names     # importable: medseg.config.bundle_dir() finds it
        for f in sorted(p for p in BUNDLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            name = "medseg/bundles/" + f.relative_to(BUNDLE.parent).as_posix()
            assert name in names, name
            assert z.read(name) == f.read_bytes(), name


# ----------------------------------------------------------------------------- the bundle README
def readme_commands() -> list[str]:
    """The shell commands of the bundle README's code block, continuation lines joined."""
    text = (BUNDLE / "docs" / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            cmds.append(" ".join(line.split()))
    return cmds


@pytest.mark.slow   # about 2 min: every documented command; the default suite covers each run entry
def test_bundle_readme_commands_run_as_documented(tiny, tmp_path):
    """Each command of docs/README.md, run as written (paths pointed at the tiny
    data, tiny training values appended): every one exits 0 and leaves its output."""
    import shlex
    base, root = tiny
    cmds = readme_commands()
    kinds = {"run training": 0, "run evaluating": 0, "run inferring": 0, "torchrun": 0,
             "verify_net_in_out": 0, "ckpt_export": 0, "onnx_export": 0, "medseg export": 0}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in cmds:
        if cmd.startswith("B="):
            continue
        if cmd.startswith("medseg demo"):
            continue   # the demo data: here the tiny dataset stands in for it
        line = (cmd.replace("$B", str(BUNDLE)).replace("demo_data/brats2023", str(root))
                .replace("data_lists/demo_brats2023.json", str(base / "split.json")))
        args = shlex.split(line)
        if "training" in args:
            args += bundle_overrides(TINY_TRAIN)
        if "ckpt_export" in args or "onnx_export" in args:
            args += TINY_MODEL[2:]   # the README's model values (cpu preset) + the tiny filters
        r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-3000:]}"
        for k in kinds:
            if k in line:
                kinds[k] += 1
    assert all(kinds.values()), kinds
    run = tmp_path / "runs" / "bundle"
    assert (run / "fold_0" / "train_summary.json").is_file()
    assert (run / "fold_0" / "summary.json").is_file()
    assert len(list((run / "masks").glob("*.nii.gz"))) == 6
    assert (tmp_path / "runs" / "bundle_full" / "fold_1" / "train_summary.json").is_file()
    full = json.loads((tmp_path / "runs" / "bundle_full" / "fold_1" / "config.json").read_text())
    assert full["preset"] == "full" and full["train"]["optimizer"] == "sgd"
    assert (tmp_path / "runs" / "brats_unet3d" / "fold_0" / "train_summary.json").is_file()
    assert json.loads((tmp_path / "runs" / "brats_unet3d" / "fold_0" / "train_summary.json")
                      .read_text())["world_size"] == 2
    assert all((run / f).is_file() for f in ("model.ts", "model.onnx", "network.onnx"))


def test_written_config_of_a_custom_preset_reloads(tmp_path):
    """`--config run/config.json` (and `cv --devices`, which relaunches folds with it)
    works for a run made from another bundle's own preset."""
    from medseg.config import load_config
    copy = tmp_path / "my_bundle"
    shutil.copytree(BUNDLE, copy)
    (copy / "configs" / "small.json").write_text(json.dumps({"preset": "small", "train#epochs": 3}))
    cfg = resolve_config("small", bundle=copy)
    assert cfg["train"]["epochs"] == 3 and presets(copy) == ["full", "cpu", "small"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path / "config.json") == cfg
    (tmp_path / "partial.json").write_text(json.dumps({"preset": "cpu", "seed": 3}))
    assert load_config(tmp_path / "partial.json") == resolve_config("cpu", ["seed=3"])
