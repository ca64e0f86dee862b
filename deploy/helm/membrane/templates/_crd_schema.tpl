{{/*
The openAPIV3Schema of a Cilium policy rule (cilium.io/v2), written once and used by both CRDs for
`spec` and each `specs[i]`. It follows the shape of Cilium 1.19's schema so that a policy written for
Cilium reaches the agent unchanged: fields Membrane does not enforce (toServices, toGroups,
fromRequires, cidrGroupRef, TLS termination, l7proto...) are declared too, with their contents kept
(x-kubernetes-preserve-unknown-fields), so the API server does not prune them silently and the agent
rejects the policy naming the field. The schema is structural: every node has a type, and the
anyOf/oneOf clauses only name properties declared beside them.
*/}}

{{- define "membrane.schema.selector" -}}
type: object
description: A label selector; keys may carry a Cilium label source prefix (k8s:, reserved:, any:).
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
      maxLength: 63
      pattern: '^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$'
  matchExpressions:
    type: array
    x-kubernetes-list-type: atomic
    items:
      type: object
      required: [key, operator]
      properties:
        key:
          type: string
        operator:
          type: string
          enum: [In, NotIn, Exists, DoesNotExist]
        values:
          type: array
          x-kubernetes-list-type: atomic
          items:
            type: string
x-kubernetes-map-type: atomic
{{- end }}

{{- define "membrane.schema.ports" -}}
type: array
maxItems: 40
items:
  type: object
  properties:
    port:
      type: string
      description: A port number (0 means every port) or a named port.
      # Cilium's pattern anchors only its first alternative, so it lets "99999" through; this one
      # anchors both (the agent refuses such a port either way).
      pattern: '^((6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*)$'
    endPort:
      type: integer
      format: int32
      minimum: 0
      maximum: 65535
    protocol:
      type: string
      description: Absent or ANY matches TCP, UDP and SCTP.
      enum: [TCP, UDP, SCTP, VRRP, IGMP, ANY]
{{- end }}

{{- define "membrane.schema.fqdnName" -}}
type: string
maxLength: 255
pattern: '^([-a-zA-Z0-9_]+[.]?)+$'
{{- end }}

{{- define "membrane.schema.fqdnPattern" -}}
type: string
maxLength: 255
pattern: '^([-a-zA-Z0-9_*]+[.]?)+$'
{{- end }}

{{- define "membrane.schema.l7" -}}
type: object
description: At most one of http, kafka, dns (or Cilium's l7proto, which Membrane rejects).
properties:
  http:
    type: array
    items:
      type: object
      properties:
        method:
          type: string
          description: Extended POSIX regex matched against the whole method; absent means any.
        path:
          type: string
          description: Extended POSIX regex matched against the whole path; absent means any.
        host:
          type: string
        headers:
          type: array
          items:
            type: string
        headerMatches:
          type: array
          items:
            type: object
            required: [name]
            properties:
              name:
                type: string
                minLength: 1
              value:
                type: string
              mismatch:
                type: string
                enum: [LOG, ADD, DELETE, REPLACE]
              secret:
                type: object
                required: [name]
                properties:
                  namespace:
                    type: string
                  name:
                    type: string
  kafka:
    type: array
    items:
      type: object
      properties:
        role:
          type: string
          enum: [produce, consume]
        apiKey:
          type: string
        apiVersion:
          type: string
        clientID:
          type: string
        topic:
          type: string
          maxLength: 255
  dns:
    type: array
    items:
      type: object
      oneOf:
        - required: [matchName]
        - required: [matchPattern]
      properties:
        matchName:
          {{- include "membrane.schema.fqdnName" . | nindent 10 }}
        matchPattern:
          {{- include "membrane.schema.fqdnPattern" . | nindent 10 }}
  l7proto:
    type: string
  l7:
    type: array
    items:
      type: object
      additionalProperties:
        type: string
{{- end }}

{{/* One ingress/egress entry; .ingress and .deny choose the variant. */}}
{{- define "membrane.schema.peerRule" -}}
{{- $pre := ternary "from" "to" .ingress -}}
type: object
properties:
  {{ $pre }}Endpoints:
    type: array
    items:
      {{- include "membrane.schema.selector" . | nindent 6 }}
  {{ $pre }}Entities:
    type: array
    items:
      type: string
      enum: [all, world, cluster, host, init, ingress, unmanaged, remote-node, health, none, kube-apiserver]
  {{ $pre }}CIDR:
    type: array
    items:
      type: string
      format: cidr
  {{ $pre }}CIDRSet:
    type: array
    items:
      type: object
      oneOf:
        - required: [cidr]
        - required: [cidrGroupRef]
        - required: [cidrGroupSelector]
      properties:
        cidr:
          type: string
          format: cidr
        except:
          type: array
          items:
            type: string
        cidrGroupRef:
          type: string
          maxLength: 253
        cidrGroupSelector:
          type: object
          x-kubernetes-preserve-unknown-fields: true
  {{ $pre }}Requires:
    type: array
    items:
      type: object
      x-kubernetes-preserve-unknown-fields: true
  {{ $pre }}Groups:
    type: array
    items:
      type: object
      x-kubernetes-preserve-unknown-fields: true
  {{ $pre }}Nodes:
    type: array
    items:
      type: object
      x-kubernetes-preserve-unknown-fields: true
  {{- if not .ingress }}
  toServices:
    type: array
    items:
      type: object
      x-kubernetes-preserve-unknown-fields: true
  {{- if not .deny }}
  toFQDNs:
    type: array
    maxItems: 50
    items:
      type: object
      oneOf:
        - required: [matchName]
        - required: [matchPattern]
      properties:
        matchName:
          {{- include "membrane.schema.fqdnName" . | nindent 10 }}
        matchPattern:
          {{- include "membrane.schema.fqdnPattern" . | nindent 10 }}
  {{- end }}
  {{- end }}
  icmps:
    type: array
    items:
      type: object
      properties:
        fields:
          type: array
          maxItems: 40
          items:
            type: object
            required: [type]
            properties:
              type:
                x-kubernetes-int-or-string: true
              family:
                type: string
                enum: [IPv4, IPv6]
  {{- if not .deny }}
  authentication:
    type: object
    x-kubernetes-preserve-unknown-fields: true
  {{- end }}
  toPorts:
    type: array
    items:
      type: object
      properties:
        ports:
          {{- include "membrane.schema.ports" . | nindent 10 }}
        {{- if not .deny }}
        rules:
          {{- include "membrane.schema.l7" . | nindent 10 }}
        terminatingTLS:
          type: object
          x-kubernetes-preserve-unknown-fields: true
        originatingTLS:
          type: object
          x-kubernetes-preserve-unknown-fields: true
        serverNames:
          type: array
          items:
            type: string
        listener:
          type: object
          x-kubernetes-preserve-unknown-fields: true
        {{- end }}
{{- end }}

{{/* One rule: `spec` or an item of `specs`. */}}
{{- define "membrane.schema.rule" -}}
type: object
description: >-
  One policy rule. Exactly one of endpointSelector and nodeSelector (CCNP only) selects its subjects;
  at least one of ingress, ingressDeny, egress, egressDeny is present.
oneOf:
  - required: [endpointSelector]
  - required: [nodeSelector]
anyOf:
  - required: [ingress]
  - required: [ingressDeny]
  - required: [egress]
  - required: [egressDeny]
properties:
  endpointSelector:
    {{- include "membrane.schema.selector" . | nindent 4 }}
  nodeSelector:
    {{- include "membrane.schema.selector" . | nindent 4 }}
  ingress:
    type: array
    items:
      {{- include "membrane.schema.peerRule" (dict "ingress" true "deny" false) | nindent 6 }}
  ingressDeny:
    type: array
    items:
      {{- include "membrane.schema.peerRule" (dict "ingress" true "deny" true) | nindent 6 }}
  egress:
    type: array
    items:
      {{- include "membrane.schema.peerRule" (dict "ingress" false "deny" false) | nindent 6 }}
  egressDeny:
    type: array
    items:
      {{- include "membrane.schema.peerRule" (dict "ingress" false "deny" true) | nindent 6 }}
  enableDefaultDeny:
    type: object
    description: Absent fields mean true when the rule has a section of that direction.
    properties:
      ingress:
        type: boolean
      egress:
        type: boolean
  description:
    type: string
  labels:
    type: array
    items:
      type: object
      required: [key]
      properties:
        key:
          type: string
        value:
          type: string
        source:
          type: string
  log:
    type: object
    properties:
      value:
        type: string
        maxLength: 32
{{- end }}

{{/* The whole object: apiVersion, kind, metadata, spec, specs, status (conditions keyed by type). */}}
{{- define "membrane.schema.policy" -}}
type: object
required: [metadata]
properties:
  apiVersion:
    type: string
  kind:
    type: string
  metadata:
    type: object
  spec:
    {{- include "membrane.schema.rule" . | nindent 4 }}
  specs:
    type: array
    items:
      {{- include "membrane.schema.rule" . | nindent 6 }}
  status:
    type: object
    properties:
      conditions:
        type: array
        x-kubernetes-list-type: map
        x-kubernetes-list-map-keys: [type]
        items:
          type: object
          required: [type, status]
          properties:
            type:
              type: string
            status:
              type: string
              enum: ["True", "False", "Unknown"]
            lastTransitionTime:
              type: string
              format: date-time
            reason:
              type: string
            message:
              type: string
      derivativePolicies:
        type: object
        x-kubernetes-preserve-unknown-fields: true
{{- end }}
