"""``python -m attnjax.compare`` refuses bad input in one line, before the study's first file."""

import pytest

from attnjax.compare.__main__ import main


def refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--dataset", "folder:{tmp}/no-such-folder"], "no-such-folder/train is missing"),
        (["--batch-size", "4096"], "larger than the 1437 training examples"),
        (["--blocks", "nosuch"], "unknown block 'nosuch'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
    ],
)
def test_a_refused_study_writes_no_file(tmp_path, capsys, options, message):
    study = tmp_path / "study"
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    assert message in refusal([*options, "--epochs", "1", "--no-progress", "--workdir", str(study)], capsys)
    assert not study.exists()


def test_a_study_folder_orbax_could_not_read_back_is_refused_before_any_file(tmp_path, capsys):
    study = tmp_path / "study[1]"
    assert "holds [ ]" in refusal(["--epochs", "1", "--no-progress", "--workdir", str(study)], capsys)
    assert not study.exists()
