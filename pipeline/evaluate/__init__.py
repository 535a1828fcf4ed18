"""Evaluation of geolocation models (`mg-geo eval`) and the pieces `mg-geo chat` shares with it.

metrics      haversine, GeoScore, accuracies by level and distance, median error
names        name normalisation and country matching (ISO codes through pipeline.stages.quality's table)
predictions  predictions / ground-truth files (jsonl or csv; OSV-5M and GAEA csv layouts)
benchmarks   public benchmarks as distributed (GAEA, im2gps3k, yfcc4k, OSV-5M): csv layouts, images
geocoded     country / region / city from reverse-geocoded coordinates (OSV-5M's way)
answer_line  reading a free-text reply's "Answer: city, region, country (lat, lon)" line (or JSON)
model        the geolocation prompt, LVLM requests and answers -> Prediction
single       one guess per test image: run a model over shards, score a predictions file
simulated    interactive evaluation with a simulated user answering the model's own guesses
interactive  the Dialogue test split replayed (--user replay): after 1 and 2 recorded user turns
report       metrics.json, metrics.md, error_cdf.png; the summary over benchmark runs
shards       reading OUT/{part}/{split}/*.tar back
"""
