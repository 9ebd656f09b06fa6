// Stand-in for ComfyUI's /scripts/app.js in the standalone glue test: records registered extensions.
export const app = {
  extensions: [],
  registerExtension(extension) {
    this.extensions.push(extension);
  },
};
