"""The runnable example at the end of docs/training.md runs and learns its toy task."""


def test_training_guide_miniature_runs(tmp_path, monkeypatch, capsys, doc_blocks, doc_examples):
    # the earlier block refers to files the reader has (slides.csv); this one makes its own
    miniature = doc_blocks("training.md")[-1]
    assert "tempfile.mkdtemp()" in miniature
    monkeypatch.chdir(tmp_path)
    (namespace,) = doc_examples("training.md", [miniature])
    assert len(namespace["result"].history) == 3
    assert "val_auc" in namespace["result"].history[-1]
