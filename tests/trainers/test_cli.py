"""`adapterdock train`: flags from Config fields, --help examples, YAML with flags winning, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterdock.cli import main as adapterdock
from trainers import classification, cli

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_every_level_of_help_has_an_example(capsys) -> None:
    top = help_text(["--help"], capsys)
    assert "examples:" in top and "classification" in top and "ner" in top and "instruction" in top
    for task in ("classification", "ner", "instruction"):
        text = help_text([task, "--help"], capsys)
        assert "example:" in text and f"adapterdock train {task}" in text
        assert "--max-steps" in text and "overrides --epochs" in text  # help from field metadata
        assert "--config FILE.yaml" in text
    assert "--text-field" in help_text(["classification", "--help"], capsys)


def test_yaml_keys_and_flags_win(tmp_path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(classification, "train", lambda config: seen.update(config=config))
    path = tmp_path / "run.yaml"
    path.write_text("task: classification\ndata: a.jsonl\nname: from-yaml\nmax-steps: 7\nrank: 4\n")
    assert cli.main(["classification", "--config", str(path), "--rank", "16", "--no-progress"]) == 0
    config = seen["config"]
    assert (config.data, config.name, config.max_steps) == ("a.jsonl", "from-yaml", 7)
    assert config.rank == 16 and config.progress is False


def test_target_modules_list(monkeypatch) -> None:
    captured = []
    monkeypatch.setattr(classification, "train", captured.append)
    cli.main(["classification", "--data", "b.jsonl", "--name", "x", "--target-modules", "q_proj", "v_proj"])
    assert captured[0].target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("place", ["before", "after"])
def test_registry_goes_before_or_after_the_task(place: str, monkeypatch) -> None:
    captured = []
    monkeypatch.setattr(classification, "train", captured.append)
    task, where = ["classification", "--data", "d.jsonl", "--name", "x"], ["--registry", "reg"]
    argv = [*where, *task] if place == "before" else [*task, *where]
    assert adapterdock(["train", *argv]) == 0
    assert captured[0].registry == "reg"


def test_unknown_yaml_key_and_bad_data_exit_2(tmp_path, capsys, make_config, small_data, registry) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: a.jsonl\nname: x\nepochz: 3\n")
    assert cli.main(["classification", "--config", str(path)]) == 2
    assert "unknown option(s): epochz" in capsys.readouterr().err
    code = cli.main(
        [
            "classification",
            "--data",
            str(DATA / "not_json.jsonl"),
            "--name",
            "x",
            "--registry",
            str(registry.root),
        ]
    )
    assert code == 2 and "not_json.jsonl:2: not a JSON line" in capsys.readouterr().err
    assert registry.list() == []


def test_a_run_prints_reference_and_metrics(capsys, small_data, registry, tiny_base) -> None:
    argv = [
        "ner", "--base", tiny_base.name_or_path, "--data", str(small_data["ner"]["data"]),
        "--eval", str(small_data["ner"]["eval"]), "--name", "cli-ner", "--max-steps", "2",
        "--max-length", "32", "--registry", str(registry.root), "--no-progress", "--no-baseline", "--cpu",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "registered cli-ner@1" in out and "f1:" in out
    assert registry.get("cli-ner@1").manifest.trainer["max_steps"] == 2
