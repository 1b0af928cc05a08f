"""A message that names more things than fit one line shows the first few and counts the rest, the
same way wherever it is built (``errors.preview``): ``a, b, c, ... 4 more``."""

from __future__ import annotations

import pytest

from ds_sft.errors import UserError, preview


@pytest.mark.parametrize(
    ("count", "shown"),
    [(0, ""), (1, "n0"), (3, "n0, n1, n2"), (4, "n0, n1, n2, ... 1 more"), (10, "n0, n1, n2, ... 7 more")],
)
def test_a_preview_names_up_to_its_limit_and_counts_the_rest(count, shown):
    assert preview([f"n{i}" for i in range(count)], 3) == shown


def test_a_folder_that_is_no_run_folder_is_named_by_its_first_entries(tmp_path):
    """``--out_dir`` of seven files: the refusal lists five and counts two, as the checkpoint and data
    refusals count theirs (it said "and 2 more")."""
    from ds_sft.train.run_dir import check_is_run_folder

    for i in range(7):
        (tmp_path / f"f{i}").write_text("")
    with pytest.raises(UserError, match=r"\(it holds f0, f1, f2, f3, f4, \.\.\. 2 more; a run folder has"):
        check_is_run_folder(tmp_path)
