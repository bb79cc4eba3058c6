"""The command line as a user meets it: output, exit status, one-line errors."""

import yaml


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("config", "fetch-examples"):
        assert command in result.stdout


def test_config_show_prints_the_merged_config(cli):
    result = cli("config", "show", "--config", "configs/pretrain/debug.yaml", "optim.lr=1e-4")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["optim"]["lr"] == 1e-4  # the override
    assert shown["model"]["name_or_path"] == "tiny"  # debug.yaml
    assert shown["optim"]["weight_decay"] == 0.01  # inherited from bert_base_phase1.yaml


def test_config_show_typo_and_wrong_type_fail_in_one_line(cli):
    typo = cli("config", "show", "--config", "configs/pretrain/debug.yaml", "optim.lrr=1e-4")
    assert typo.returncode == 2 and typo.stdout == ""
    assert typo.stderr == ("dtrain: error: unknown key optim.lrr — did you mean optim.lr? "
                           "(command-line override optim.lrr=1e-4)\n")
    wrong = cli("config", "show", "data.max_seq_len=long")
    assert wrong.returncode == 2
    assert wrong.stderr == ("dtrain: error: data.max_seq_len: expected int, got long "
                            "(command-line override data.max_seq_len=long)\n")


def test_missing_config_file(cli, tmp_path):
    result = cli("config", "show", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.startswith("dtrain: error: config file ") and "not found" in result.stderr
    assert result.stderr.count("\n") == 1


def test_config_keys_lists_every_section(cli):
    result = cli("config", "keys")
    assert result.returncode == 0
    sections = {line.split(".")[0] for line in result.stdout.splitlines() if "." in line.split()[0]}
    assert sections == {"model", "data", "optim", "schedule", "precision", "parallel", "checkpoint", "logging",
                        "eval", "early_stopping", "task", "peft", "continual", "distill"}


def test_prepare_pretrain_and_finetune_from_the_command_line(cli, tmp_path, tokenizer_dir):
    from tests.conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", docs=6)
    ok = cli("prepare", "pretrain", str(corpus), "--out", str(tmp_path / "pre"), "--tokenizer", str(tokenizer_dir),
             "--max-seq-len", "64", "--workers", "1", "--shard-size", "2KB")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{tmp_path / 'pre'}: ") and "from 6 documents" in ok.stdout
    again = cli("prepare", "pretrain", str(corpus), "--out", str(tmp_path / "pre"), "--tokenizer", str(tokenizer_dir))
    assert again.returncode == 2
    assert again.stderr == (f"dtrain: error: {tmp_path / 'pre'} already exists and is not empty; choose another "
                            f"output dir or pass --overwrite\n")
    (tmp_path / "train.jsonl").write_text('{"text": "the film", "label": "pos"}\n{"text": "the bank"}\n')
    bad = cli("prepare", "finetune", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "ft"), "--tokenizer",
              str(tokenizer_dir))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "train.jsonl line 2: no value for 'label'" in bad.stderr
    assert not (tmp_path / "ft").exists()
