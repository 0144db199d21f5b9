"""Every shipped recipe loads and validates, and opens with its launch command."""

from pathlib import Path

import pytest

from pixart_tune.config import load_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_is_more_than_one_recipe():
    assert len(RECIPES) > 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_documents_its_launch(recipe):
    cfg = load_config(recipe)
    assert cfg.output_dir
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), "a recipe opens with a comment"
    assert "pixart-tune " in recipe.read_text() or "accelerate launch" in recipe.read_text()
    assert "Sized for" in recipe.read_text() or "measured" in recipe.read_text().lower()
