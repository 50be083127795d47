# Sphinx configuration of the series' website, built by `make book` (vqvae_lib/book.py) from the notebooks as
# `make figures` executed them. Everything the pages load is installed with the package (theme, MathJax, fonts):
# no page fetches anything from another host.
project = "hipmri-vqvae"
author = "the hipmri-vqvae authors"
copyright = "2026, the hipmri-vqvae authors"
extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the latter copies MathJax 3 into _static/

root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # README links to its own sections (#quick-start) resolve
nb_execution_mode = "off"  # the outputs are those of the executed notebooks, never recomputed here
nb_ipywidgets_js = {}  # no widget manager from a CDN: widgets show their static figure instead
nb_merge_streams = True
suppress_warnings = ["mystnb.unknown_mime_type"]  # tqdm's widget bars: their text form is shown instead

html_theme = "sphinx_book_theme"
html_title = "hipmri-vqvae: the VQ-VAE, step by step"
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_js_files = ["book.js"]
html_show_sourcelink = False
html_copy_source = False
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
}
