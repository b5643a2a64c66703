"""Datasets shipped with imrnns (BEIR layout, gzip-compressed); see each folder's SOURCE.md."""
