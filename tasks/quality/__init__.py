"""Data quality from the cached features: near-duplicates and train/test leaks, label issues, outliers.

Owns: the ``quality:`` config and plan (``plan``), the streamed neighbour searches (``search``: near-duplicate
pairs within and across splits, the distance to the k-th neighbour overall and within the class, the labels of
the nearest training images), label issues (``label_issues``: out-of-fold probabilities of a logistic probe and
Confident Learning), the contact sheets (``sheets``) and the stage (``stage``: findings.json, quality.md, one
PNG per finding).
May import: ``tasks.data`` (images for the sheets), ``tasks.index`` (the exact search), ``storage`` and the
shared ``tasks`` modules. No backbone pass: everything is read from the
feature files.
"""
