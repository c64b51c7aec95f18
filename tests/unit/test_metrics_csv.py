"""training.loop.write_metrics: metrics.csv is real CSV (quoted where needed) next to Parquet."""

from __future__ import annotations

import csv
import io

from shared import storage
from training.loop import read_metrics, write_metrics


def test_values_with_commas_quotes_and_line_breaks_survive_a_csv_reader(tmp_path):
    rows = [{"step": 1, "loss": 0.5, "note": 'warm-up, "slow"'},
            {"step": 2, "loss": 0.25, "note": "two\nlines"},
            {"step": 3, "loss": 0.125, "note": "plain"}]
    write_metrics(str(tmp_path), rows, write_csv=True)
    text = storage.read_text(str(tmp_path / "metrics.csv"))
    assert text.splitlines()[0] == "step,loss,note"  # names need no quotes, so get none
    assert '"warm-up, ""slow"""' in text  # the field quoted, its quotes doubled
    back = list(csv.DictReader(io.StringIO(text)))
    assert back == [{"step": "1", "loss": "0.5", "note": 'warm-up, "slow"'},
                    {"step": "2", "loss": "0.25", "note": "two\nlines"},
                    {"step": "3", "loss": "0.125", "note": "plain"}]
    assert read_metrics(str(tmp_path), upto_step=2) == rows[:2]  # the Parquet copy agrees


def test_columns_are_those_of_the_first_row_and_csv_can_be_left_out(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "loss_scale": 1024.0}]
    write_metrics(str(tmp_path / "a"), rows, write_csv=True)
    assert storage.read_text(str(tmp_path / "a" / "metrics.csv")) == "step,loss\n1,1.0\n2,0.5\n"
    write_metrics(str(tmp_path / "b"), rows, write_csv=False)
    assert not storage.exists(str(tmp_path / "b" / "metrics.csv"))
    assert storage.exists(str(tmp_path / "b" / "metrics.parquet"))
