"""``matrix``: a recipe's steps applied in order (:mod:`.build`), the steps themselves
(:mod:`.steps`, pure numpy), imputation (:mod:`.impute`), reading the cube in blocks of
whole genes (:mod:`.read`), writing the result (:mod:`.write`), the recipe and its TOML
(:mod:`.recipe`) and the methods paragraph (:mod:`.methods`)."""
