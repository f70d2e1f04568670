"""The names of what a sweep records: final metrics, score labels, classes.tsv."""

from __future__ import annotations

from tinyopt.core import record
from tinyopt.results.bundle import read_classes

CLASSES = [(0, "n01443537", "goldfish, Carassius auratus"), (1, "n02124075", "Egyptian cat"),
           (2, "n09246464", "cliff, drop, drop-off")]


def test_final_prefixes_a_score():
    assert record.final(record.TEST_TOP1) == "final_test_top1"
    assert record.final(record.SELECTION_LOG_LOSS) == "final_selection_log_loss"


def test_every_score_and_log_loss_has_a_label_and_nothing_else_does():
    assert set(record.SCORE_LABELS) == {*record.SCORES, *record.LOG_LOSSES}
    assert record.SCORE_LABELS[record.SELECTION_TOP5] == "selection top-5"
    assert len(set(record.SCORE_LABELS.values())) == len(record.SCORE_LABELS)


def test_the_objective_is_a_score_and_an_epoch_metric():
    assert record.OBJECTIVE_NAME == record.SELECTION_TOP1 == record.SCORES[0]
    assert record.OBJECTIVE_NAME in record.EPOCH_METRICS
    assert record.BEST_SO_FAR == f"best_{record.OBJECTIVE_NAME}"


def test_classes_tsv_has_a_header_and_one_row_per_class():
    text = record.classes_tsv(CLASSES)
    assert text.splitlines() == ["index\twnid\tname", "0\tn01443537\tgoldfish, Carassius auratus",
                                 "1\tn02124075\tEgyptian cat", "2\tn09246464\tcliff, drop, drop-off"]
    assert text.endswith("\n")


def test_classes_tsv_round_trips_through_read_classes(tmp_path):
    path = tmp_path / record.CLASSES_FILE
    path.write_text(record.classes_tsv((str(i), wnid, name) for i, wnid, name in CLASSES))  # indices as text too
    assert read_classes(path) == CLASSES
