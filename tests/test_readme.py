"""The README's generated blocks (vqvae_lib.readme) hold exactly what the committed results give, and what the
README says of the notebooks' parameters is what their parameters cells declare."""

import re

import papermill
import pytest

from vqvae_lib import readme, runner


@pytest.mark.parametrize("block", sorted(readme.SOURCES))
def test_each_generated_block_holds_what_its_results_file_gives(block):
    assert readme.read_block(block) == readme.expected_block(block), (
        f"the README's {block} block is stale: rerun {readme.SOURCES[block].split(' from ')[0]}")


def test_write_block_replaces_only_the_block(tmp_path):
    path = tmp_path / "README.md"
    begin, end = readme.markers("generation")
    path.write_text(f"# title\n\n{begin}\nold\n{end}\n\nafter\n")
    readme.write_block("generation", "| new |\n", path)
    assert path.read_text() == f"# title\n\n{begin}\n| new |\n{end}\n\nafter\n"
    assert readme.read_block("generation", path) == "| new |\n"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match=f"{path} must hold the markers of its generation block once each"):
        readme.write_block("generation", "x", path)


def test_the_readme_names_every_notebooks_parameters(tmp_path):
    declared = {}
    for script in runner.notebook_paths():
        nb = runner.to_ipynb(script, tmp_path)
        declared[script.stem[:2]] = set(papermill.inspect_notebook(str(nb)))
    everyone = set.intersection(*declared.values())
    sentence = re.search(r"Each notebook has a `parameters` cell: every one has (.*?);", readme.README.read_text(),
                         flags=re.S).group(1)
    assert set(re.findall(r"`([A-Z_]+)`", sentence)) == everyone
    text = " ".join(readme.README.read_text().split())
    assert "04 to 07 also have `DEVICE`" in text and {n for n, d in declared.items() if "DEVICE" in d} == {"04", "05", "06", "07"}
    assert "04, 06 and 07 `TRAIN`" in text and {n for n, d in declared.items() if "TRAIN" in d} == {"04", "06", "07"}
    assert "03, 05 and 08 `RESULTS_DIR`" in text
    assert {n for n, d in declared.items() if "RESULTS_DIR" in d} == {"03", "05", "08"}
