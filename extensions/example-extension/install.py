# Runs only when you confirm it in the Extensions tab. A real extension would install its requirements here.
print("example-extension: nothing to install")
