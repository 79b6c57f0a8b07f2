import subprocess
import sys

import pytest

from medseg.cli import build_parser, main


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; from medseg.cli import build_parser; build_parser().format_help(); "
            "bad = [m for m in ('torch', 'monai', 'nibabel', 'sklearn') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_choices_come_from_their_definitions():
    from medseg.cli import LAYOUT_NAMES
    from medseg.data.discover import LAYOUTS
    from medseg.labels import CONVENTIONS
    assert list(LAYOUT_NAMES) == list(LAYOUTS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    conv = next(a for a in sub["predict"]._actions if a.dest == "convention")
    assert list(conv.choices) == list(CONVENTIONS)


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("medseg ")


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_synth_check_split(tmp_path, capsys, layout):
    """The issue's acceptance sequence, in process, for each layout (10 cases, 5 folds)."""
    root = tmp_path / layout
    assert main(["data", "synth", "--cases", "10", "--layout", layout, "--out", str(root),
                 "--shape", "40", "40", "28"]) == 0
    assert main(["data", "check", "--root", str(root)]) == 0
    assert main(["data", "split", "--root", str(root), "--folds", "5",
                 "--out", str(tmp_path / "dl.json")]) == 0
    out = capsys.readouterr().out
    assert "10 cases in 5 folds" in out
    assert main(["data", "index", "--root", str(root)]) == 0
    assert f"layout      {layout}" in capsys.readouterr().out


def test_index_json(dataset, capsys):
    import json
    root = dataset("brats2023", cases=4, test_cases=1)
    assert main(["data", "index", "--root", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "brats2023" and len(info["cases"]) == 5


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["data", "check", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseg: error:") and "Traceback" not in err
    assert "nowhere" in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["data", "split", "--root", "x"])       # --out missing
    assert exc.value.code == 2


def test_every_command_explains_itself_with_examples(capsys):
    import pytest
    commands = [["cv"], ["train"], ["predict"], ["evaluate"], ["export"], ["report"], ["demo"],
                ["data"], ["data", "synth"], ["data", "index"], ["data", "check"], ["data", "split"]]
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and f"medseg {' '.join(cmd)}" in text, cmd
    with pytest.raises(SystemExit):
        main(["cv", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # The default that matters: a bare `medseg cv` runs the 300-epoch GPU recipe.
    assert "default: full" in text and "300 epochs" in text
