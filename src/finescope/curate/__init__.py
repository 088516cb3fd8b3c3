"""Stage 1: SAE-guided domain data selection (`finescope curate`); entry point `finescope.curate.run.run`."""
