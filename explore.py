"""Serve the neuron explorer, a local web app: see what each unit of a language model does.

    python explore.py                                   # the shipped model, Binary SST validation texts
    python explore.py --load_model openai_transfer/classifier.pt --port 8001
    # then open http://127.0.0.1:8000/ (the server uses no network and fetches nothing)

Views: Try text (each character coloured by a unit, P(positive), traces of the top units), Units
(weight, accuracy alone, histogram by class, the corpus texts exciting a unit most and least, ranking)
and Steer (generation with a unit forced). Corpus statistics are computed once and cached.
Every long flag may be spelled with dashes or underscores.
"""

import sys

from sentiment_discovery.explore import main

if __name__ == "__main__":
    sys.exit(main())
