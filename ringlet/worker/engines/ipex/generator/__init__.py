"""Generation for the ipex engine."""
