// MathJax 2, bundled into the site from the jupyter-server-mathjax package (no CDN): the
// combined TeX + HTML-CSS configuration that Jupyter itself loads, with its STIX web fonts.
// Typesets the pages' \( \) and \[ \] (pymdownx.arithmatex) and the notebooks' $ $ and $$ $$.
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true
  },
  "HTML-CSS": {
    availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web",
    // its font probe would fetch url('about:blank'), which a page opened from disk may not load
    styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax_Blank')"}}
  },
  // no quick preview and no hidden MathML copy: they would ask for MathJax's own TeX fonts,
  // which the package does not ship
  "fast-preview": {disabled: true},
  AssistiveMML: {disabled: true},
  menuSettings: {CHTMLpreview: false, assistiveMML: false},
  showMathMenu: false,
  messageStyle: "none"
};
