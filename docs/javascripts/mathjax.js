// MathJax 3 configuration for pymdownx.arithmatex in generic mode: the extension wraps math in
// <span class="arithmatex">\(...\)</span> and <div class="arithmatex">\[...\]</div>; MathJax typesets only those.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};
