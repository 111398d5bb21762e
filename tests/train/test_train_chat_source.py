"""Training on a chat dataset from the command line (`moelab prepare --format chat` then `moelab train`),
and the chat source's check of token ids against the model's vocabulary."""

import json

import numpy as np
import pytest
from train_helpers import tiny_cfg, write_yaml

from moelab.cli import main
from moelab.config import load_config
from moelab.data.chat_template import ChatTemplate
from moelab.errors import UserError
from moelab.tokenizer import EOD, ByteTokenizer
from moelab.train.chat_source import ChatSource


@pytest.fixture
def chat_data(tmp_path):
    tok_dir = tmp_path / "tok"
    ByteTokenizer([EOD, *ChatTemplate().specials]).save(tok_dir)
    ChatTemplate().save(tok_dir)
    src = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"What is {a}+{a}?", "completion": str(2 * a)} for a in range(40)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat"
    args = ["prepare", "--format", "chat", "--tokenizer", str(tok_dir), "--input", str(src), "--out", str(out)]
    assert main([*args, "--seq-len", "31", "--val-fraction", "0.1", "--quiet"]) == 0
    return out


def test_train_cli_on_a_chat_dataset_runs(chat_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "ft.yaml", tiny_cfg(chat_data, data={"seq_len": 31}, train={"steps": 3}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    assert "done: step 3" in capsys.readouterr().out
    assert (run / "checkpoints").is_dir()


def test_chat_token_ids_outside_the_vocab_are_refused_in_one_line(chat_data, tmp_path, capsys):
    cfg = load_config(tiny_cfg(chat_data, data={"seq_len": 31}))
    source = ChatSource(cfg)
    source.check_token_ids(cfg.model.vocab_size)  # a good dataset passes
    ids = np.memmap(chat_data / "train.bin", dtype=source.meta["dtype"], mode="r+")
    ids[5] = source.vocab_size + 3  # an id the tokenizer never makes: a corrupt dataset
    ids.flush()
    with pytest.raises(UserError) as e:
        ChatSource(cfg).check_token_ids(cfg.model.vocab_size)
    msg = str(e.value)
    assert "\n" not in msg and f"token id {source.vocab_size + 3}" in msg and "train split" in msg
    cfg_path = write_yaml(tmp_path / "ft.yaml", tiny_cfg(chat_data, data={"seq_len": 31}, train={"steps": 1}))
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moelab train: error: ") and "outside the vocabulary" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
