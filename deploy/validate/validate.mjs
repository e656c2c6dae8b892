// Validate the custom resources of Kubernetes manifests offline, with the validators that the
// kubernetes-models packages generate from the Gateway API, KEDA and Prometheus operator API types
// (types, required fields, enums). Core kinds are left to kubernetes-validate (the Python test).
//
//   node deploy/validate/validate.mjs FILE.yaml...
//
// Prints one JSON line per document: {"file", "kind", "name", "checked", "error"}; exits 1 when a
// custom resource is invalid or of a kind this script does not know.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { Gateway } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway";
import { GRPCRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GRPCRoute";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = [Gateway, GRPCRoute, ScaledObject, ServiceMonitor];
const CORE_GROUPS = /^(v1|apps\/v1|policy\/v1|autoscaling\/v2|kustomize\.config\.k8s\.io\/.*)$/;

let failed = false;
for (const file of process.argv.slice(2)) {
  for (const document of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (document.errors.length) {
      console.log(JSON.stringify({ file, error: document.errors.map(String).join("; ") }));
      failed = true;
      continue;
    }
    const data = document.toJS();
    if (data === null) continue;
    const line = { file, kind: data.kind, name: data.metadata?.name ?? "", checked: false, error: null };
    const Model = MODELS.find((m) => m.apiVersion === data.apiVersion && m.kind === data.kind);
    if (Model) {
      line.checked = true;
      try {
        new Model(data).validate();
      } catch (error) {
        line.error = error.message;
        failed = true;
      }
    } else if (!CORE_GROUPS.test(data.apiVersion ?? "")) {
      line.error = `no validator for ${data.apiVersion} ${data.kind}`;
      failed = true;
    }
    console.log(JSON.stringify(line));
  }
}
process.exit(failed ? 1 : 0);
