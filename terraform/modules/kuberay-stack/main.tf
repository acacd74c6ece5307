# What every expertmesh cluster runs besides the cloud's own pieces: the KubeRay
# operator and kube-prometheus-stack (Prometheus, Grafana with its dashboard
# sidecar). Chart versions are pinned literally (not variables) so a plan
# never pulls a chart nobody reviewed.

locals {
  monitoring_namespace = "monitoring"
}

resource "helm_release" "kube_prometheus_stack" {
  name             = "kube-prometheus-stack"
  namespace        = local.monitoring_namespace
  create_namespace = true
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = "75.12.0"

  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        # Select every PodMonitor/ServiceMonitor/PrometheusRule in the cluster,
        # not just those labelled with this release (the Ray PodMonitor and the
        # DCGM ServiceMonitor are not).
        podMonitorSelectorNilUsesHelmValues     = false
        serviceMonitorSelectorNilUsesHelmValues = false
        ruleSelectorNilUsesHelmValues           = false
        retention                               = "15d"
        nodeSelector                            = var.node_selector
      }
    }
    grafana = {
      nodeSelector = var.node_selector
      sidecar = {
        dashboards = {
          # Loads every ConfigMap labelled grafana_dashboard: "1", e.g. the
          # expertmesh MoE dashboard of modules/expertmesh-app.
          enabled         = true
          label           = "grafana_dashboard"
          labelValue      = "1"
          searchNamespace = "ALL"
        }
      }
    }
    # Managed control planes: these targets cannot be scraped from inside the
    # cluster and would only fire alerts.
    kubeControllerManager = { enabled = false }
    kubeScheduler         = { enabled = false }
    kubeEtcd              = { enabled = false }
    kubeProxy             = { enabled = var.scrape_kube_proxy }
  })]

  set_sensitive {
    name  = "grafana.adminPassword"
    value = var.grafana_admin_password
  }
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  # Must match the KubeRay CRDs vendored by expertmesh (1.7).
  version = "1.7.0"

  values = [yamlencode({
    nodeSelector = var.node_selector
  })]
}
