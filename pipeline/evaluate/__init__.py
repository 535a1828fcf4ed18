"""Evaluation of geolocation models (`mg-geo eval`) and the pieces `mg-geo chat` shares with it.

metrics      haversine, GeoScore, accuracies by level and distance, median error
names        name normalisation and country matching (ISO codes through pipeline.stages.quality's table)
predictions  predictions / ground-truth files (jsonl or csv; OSV-5M and GAEA csv layouts)
model        the geolocation prompt, LVLM requests and answers -> Prediction
single       one guess per test image: run a model over shards, score a predictions file
interactive  the Dialogue test split replayed: first guess, then after 1 and 2 user turns
report       metrics.json, metrics.md, error_cdf.png
shards       reading OUT/{part}/{split}/*.tar back
"""
