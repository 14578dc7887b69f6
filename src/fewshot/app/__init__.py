"""``fewshot app``: a local web page to teach a model new classes from a few images.

Make classes, drop a handful of images into each, adapt, and see predictions for new images at
once; download the adapted classifier (:mod:`fewshot.inference.adapted`). Four parts, read in
this order:

- :mod:`fewshot.app.workspace`: the classes and images of the page, stored in a temporary
  folder under names the server chooses (checked on upload: size, decodable image, limits);
- :mod:`fewshot.app.session`: the model, adapting it to the workspace and predicting;
- :mod:`fewshot.app.server`: the HTTP server (standard library only) and its JSON API;
- :mod:`fewshot.app.cli`: ``fewshot app``, which binds to 127.0.0.1 unless told otherwise and
  removes the temporary folder at exit.

The page itself (``static/``: HTML, JavaScript, CSS) ships in the package and fetches nothing
from the internet. Like :mod:`fewshot.inference`, this package imports neither Lightning nor
the training shell.
"""
