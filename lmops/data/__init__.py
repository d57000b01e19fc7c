"""Reading text: the corpus a model is trained on."""
