"""The examples in docs/io.md run, in order, in a scratch directory."""


def test_io_guide_examples_run(tmp_path, monkeypatch, doc_blocks, doc_examples):
    assert len(doc_blocks("io.md")) >= 4
    monkeypatch.chdir(tmp_path)
    doc_examples("io.md", shared=False)
