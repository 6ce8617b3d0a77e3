"""Preference data: read records (`preference`), tokenize and filter them (`formatting`), and
batch them through grain (`pipeline`)."""
