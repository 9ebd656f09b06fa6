// Validate glTF/GLB files with the Khronos glTF validator; print one JSON report per file (an array).
// Usage: node validate.js FILE.glb [FILE2.glb ...]   (exit 0; the Python test reads the counts)
const fs = require("fs");
const path = require("path");
const validator = require("gltf-validator");

async function main() {
  const reports = [];
  for (const file of process.argv.slice(2)) {
    const data = new Uint8Array(fs.readFileSync(file));
    const report = await validator.validateBytes(data, {
      uri: path.basename(file),
      maxIssues: 50,
      // A GLB is self-contained: any external resource is an error by itself.
      externalResourceFunction: (uri) => Promise.reject(new Error(`external resource ${uri}`)),
    });
    reports.push({ file, issues: report.issues, info: report.info });
  }
  process.stdout.write(JSON.stringify(reports));
}

main().catch((e) => { console.error(e); process.exit(2); });
