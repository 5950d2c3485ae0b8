// Loaded between require.js and the ipywidgets HTML manager (embed-amd.js) on pages with
// widgets; `make book` copies it next to them into the HTML's widgets/ folder.
(function () {
  "use strict";
  // 1. Each AMD module of the manager takes its folder as webpack public path, where it looks
  //    for its icon fonts; require.js puts them under the page's folder
  //    (book/@jupyter-widgets/..., book/@jupyter-widgets/html-manager/dist/). Point them all
  //    at this script's own folder, which holds the fonts (the modules themselves are all
  //    defined inside embed-amd.js, so nothing is loaded from these paths).
  var here = document.currentScript.src.replace(/[?#].*$/, "");
  var folder = here.slice(0, here.lastIndexOf("/"));
  window.requirejs.config({
    paths: { "@jupyter-widgets": folder, "@jupyter-widgets/html-manager/dist": folder },
  });

  // 2. The manager typesets widget labels with MathJax 2's MathJax.Hub.Queue; the book loads
  //    MathJax 3, which has no Hub ("Cannot read properties of undefined (reading 'Queue')").
  //    Widgets render on window load, after DOMContentLoaded, when MathJax 3 is defined.
  document.addEventListener("DOMContentLoaded", function () {
    var mathjax = window.MathJax;
    if (!mathjax || mathjax.Hub) return;
    mathjax.Hub = {
      Queue: function (job) {
        var element = job && job[2];
        if (!element || !mathjax.startup || !mathjax.startup.promise) return;
        mathjax.startup.promise.then(function () {
          return mathjax.typesetPromise([element]);
        });
      },
    };
  });
})();
