// Stand-in for ComfyUI's /scripts/api.js: apiURL() prefixes "/api" like the real frontend.
export const api = {
  apiURL(route) {
    return `/api${route}`;
  },
};
