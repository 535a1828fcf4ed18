"""What a build says about itself: report.json, label agreement, plots, the dataset card."""
