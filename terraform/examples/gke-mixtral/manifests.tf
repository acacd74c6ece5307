# The KubeRay manifests under infra/k8s are the single source of truth; this
# example only swaps the image and applies them.

locals {
  repo_root = "${path.module}/../../.."

  manifest_files = concat(
    [
      "models-pvc.yaml",
      "networkpolicy.yaml",
      "model-loader-job.yaml",
      "rayservice.yaml",
      "monitoring/podmonitor-ray.yaml",
    ],
    var.apply_finetune_job ? ["rayjob-finetune.yaml"] : [],
  )

  # One entry per YAML document, keyed by file and object so for_each keys
  # are known at plan time.
  manifest_documents = merge([
    for manifest, docs in data.kubectl_file_documents.expertmesh : {
      for self_link, body in docs.manifests : "${manifest}:${self_link}" => body
    }
  ]...)
}

data "kubectl_file_documents" "expertmesh" {
  for_each = toset(local.manifest_files)

  # The manifests name the image `expertmesh:0.1.0` and the loader's source `builtin:tiny`: put ours in.
  content = replace(
    replace(file("${local.repo_root}/infra/k8s/${each.key}"), "expertmesh:0.1.0", var.image),
    "value: builtin:tiny", "value: ${var.model_source}",
  )
}

# kubectl_manifest rather than kubernetes_manifest: the latter resolves the
# RayService/RayJob/PodMonitor schemas at plan time and fails before the
# KubeRay operator and kube-prometheus-stack (which bring the CRDs) exist.
resource "kubectl_manifest" "expertmesh" {
  for_each = local.manifest_documents

  yaml_body         = each.value
  server_side_apply = true
  wait              = true
  # Jobs and RayJobs are immutable once started: a new image means a new run.
  force_new = contains(["Job", "RayJob"], yamldecode(each.value).kind)

  depends_on = [
    module.cluster, # the KubeRay operator and kube-prometheus-stack releases, hence the CRDs
    kubernetes_namespace.expertmesh,
    kubernetes_secret.api_key,
    kubernetes_secret.hf_token,
  ]
}

resource "kubernetes_config_map" "grafana_dashboard" {
  metadata {
    name      = "expertmesh-moe-dashboard"
    namespace = module.cluster.monitoring_namespace
    labels = {
      # Picked up by the Grafana dashboard sidecar of kube-prometheus-stack.
      grafana_dashboard = "1"
    }
  }

  data = {
    "expertmesh-moe.json" = file("${local.repo_root}/infra/grafana/expertmesh-moe.json")
  }
}
