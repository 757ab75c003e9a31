"""comlora_ds.checkpointing.manifest by hand: file hashes, the base model's storage-independent fingerprint, resume
changes."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from comlora_ds.checkpointing import manifest
from conftest import tiny_llama


def test_sha256_and_verify_name_the_changed_or_missing_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("x")
    manifest.write(tmp_path, {"data.train_files[0]": "d" * 64}, {"name": "hub/model"}, {"data.seed": 1})
    saved = json.loads((tmp_path / manifest.MANIFEST).read_text())
    assert saved["files"] == {"a.bin": hashlib.sha256(b"abc").hexdigest(), "sub/b.txt": hashlib.sha256(b"x").hexdigest()}
    assert manifest.verify(tmp_path) == saved
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(manifest.ManifestError, match=r"a.bin is not the file that was written"):
        manifest.verify(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(manifest.ManifestError, match=r"a.bin is missing"):
        manifest.verify(tmp_path)


def test_a_checkpoint_without_a_manifest_is_used_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="has no manifest.json"):
        assert manifest.verify(tmp_path) is None


def test_base_fingerprint_ignores_storage_and_sees_other_weights(tmp_path):
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16-sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "bf16-sharded").glob("*.safetensors"))) > 1
    fp32, bf16 = (manifest.base_model_fingerprint(str(tmp_path / n)) for n in ("fp32", "bf16-sharded"))
    assert fp32 == bf16 and set(fp32) == {"config", "weights"}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += 0.5
    model.save_pretrained(tmp_path / "other")
    other = manifest.base_model_fingerprint(str(tmp_path / "other"))
    assert other["config"] == fp32["config"] and other["weights"] != fp32["weights"]
    assert manifest.base_model_fingerprint("org/hub-model") == {"name": "org/hub-model"}


def test_resume_changes_list_what_differs():
    saved = {"data": {"data.train_files[0]": "a" * 64}, "base_model": {"name": "m"},
             "settings": {"data.seed": 42, "train.learning_rate": 1e-3}}
    same = manifest.resume_changes(saved, {"data.train_files[0]": "a" * 64}, {"name": "m"},
                                   {"data.seed": 42, "train.learning_rate": 1e-3})
    assert same == []
    changes = manifest.resume_changes(saved, {"data.train_files[0]": "b" * 64}, {"name": "n"},
                                      {"data.seed": 7, "train.learning_rate": 1e-3})
    assert changes == [("data.train_files[0]", "sha256 aaaaaaaaaaaa", "sha256 bbbbbbbbbbbb"), ("base model", "m", "n"),
                       ("data.seed", 42, 7)]


GOOD = {"files": {}, "data": {"data.train_files[0]": "d" * 64}, "base_model": {"name": "hub/model"},
        "settings": {"data.seed": 1}}


@pytest.mark.parametrize("text,message", [
    ('{"files": {', "manifest.json is damaged (not valid JSON"),
    ("[]", "manifest.json is damaged: its top level is a list, not a dict"),
    (json.dumps({**GOOD, "files": ["a.bin"]}), "damaged: files is a list, not an object"),   # was AttributeError
    (json.dumps({"files": {}}), "damaged: data is missing"),                  # passed, then KeyError: 'data'
    (json.dumps({**GOOD, "settings": None}), "damaged: settings is a NoneType, not an object"),
    (json.dumps({**GOOD, "files": {"a.bin": 3}}), "damaged: files['a.bin'] is not a relative file name with a sha256"),
    (json.dumps({**GOOD, "files": {"../../etc/passwd": "0" * 64}}), "files['../../etc/passwd'] is not a relative"),
    (json.dumps({**GOOD, "data": {"data.train_files[0]": 7}}), "damaged: data['data.train_files[0]'] is a int"),
    (json.dumps({**GOOD, "base_model": {"weights": ["x"]}}), "damaged: base_model['weights'] is a list"),
])
def test_a_damaged_manifest_is_refused_naming_the_field(tmp_path, text, message):
    (tmp_path / manifest.MANIFEST).write_text(text)
    with pytest.raises(manifest.ManifestError, match=re.escape(message)):
        manifest.verify(tmp_path)
