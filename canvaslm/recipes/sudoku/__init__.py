"""The Sudoku recipe: puzzles and data (`puzzles`, `data`), the model shape (`model_config`), training
(`train`, `recipe.yaml`), solving (`solve`), evaluation (`eval`) and `canvaslm sudoku` (`cli`). The
trained model in `model/` is the package's bundled default (`canvaslm.LLM()`); see docs/sudoku.md."""
