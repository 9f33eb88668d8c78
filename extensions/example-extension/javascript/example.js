// Loaded into the page with the studio's own scripts.
window.exampleExtensionLoaded = true;
